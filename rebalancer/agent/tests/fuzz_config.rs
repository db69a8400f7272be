//! Fuzzing the agent's configuration parser (issue #11): mutations of deploy/etc/agent.toml
//! and of the test lab's configuration, and arbitrary text. Properties: no panic, no hang; a
//! TOML error names its line and column inside the text; a refused value names its field.
//!
//! Campaign: `PROPTEST_CASES=20000 cargo test --release -p rebalancer-agent --test fuzz_config`.

#[path = "../../../fuzz/toml_edits.rs"]
mod toml_edits;

use std::path::Path;

use proptest::prelude::*;
use rebalancer_agent::config::{AgentConfig, ConfigError};
use toml_edits::{apply, edit, no_hang, toml_syntax_error};

const LAB: &str = r#"node = "n1"
listen = "198.18.16.2:7878"
control_socket = "/tmp/rbt0-lab/n1.sock"
container_subnet = "198.19.16.0/24"
state_dir = "/tmp/rbt0-lab/n1"
encrypt_memory = true
peer_protocol = [1, 2]
admin_uids = [1000]
host_dirs = ["/usr", "/etc"]
[auth]
method = "munge"
munge_socket = "/run/munge/munge.socket.2"
[peers]
n2 = "198.18.16.3:7878"
"#;

fn seeds() -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/etc/agent.toml");
    vec![
        std::fs::read_to_string(p).expect("deploy/etc/agent.toml"),
        LAB.to_string(),
    ]
}

fn check(text: String) {
    let lines = text.lines().count() + 1;
    let syntax = toml_syntax_error(&text);
    match AgentConfig::from_toml(&text, Path::new("fuzz.toml")) {
        Ok(_) => assert!(!syntax, "accepted a text TOML rejects: {text:?}"),
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.trim().is_empty());
            match &e {
                ConfigError::Parse { line, column, .. } => {
                    assert!(
                        shown.starts_with(&format!("fuzz.toml:{line}:{column}: ")),
                        "{shown}"
                    );
                    assert!(
                        (1..=lines).contains(line) && *column >= 1,
                        "{line}:{column} outside the text: {shown}"
                    );
                }
                ConfigError::Invalid {
                    field, reason, at, ..
                } => {
                    assert!(!syntax, "a syntax error reported as a value: {shown}");
                    let (_, l, c) = at.as_ref().expect("an invalid value has a place");
                    assert!((1..=lines).contains(l) && *c >= 1, "{l}:{c}: {shown}");
                    assert!(shown.contains(field) && !reason.is_empty(), "{shown}");
                }
                ConfigError::Read { .. } => panic!("read error from text: {shown}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(toml_edits::config(256))]

    #[test]
    fn mutated_configurations_never_panic_and_errors_have_places(
        seed in any::<proptest::sample::Index>(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        let text = apply(seed.get(&seeds).as_str(), &edits);
        no_hang("agent config", move || check(text))?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        no_hang("agent config text", move || check(text))?;
    }
}

#[test]
fn the_seeds_parse() {
    for s in seeds() {
        AgentConfig::from_toml(&s, Path::new("a.toml")).unwrap_or_else(|e| panic!("{e}"));
    }
}
