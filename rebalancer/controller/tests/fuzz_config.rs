//! Fuzzing rebalancerd's configuration parser (issue #11): mutations of the shipped files
//! (deploy/etc/rebalancerd.toml, rebalancerd.example.toml) and arbitrary text. Properties: no
//! panic, no hang; every error names `file:line:column` inside the text and says something.
//!
//! Campaign: `PROPTEST_CASES=20000 cargo test --release -p rebalancer-controller --test fuzz_config`.

#[path = "../../../fuzz/toml_edits.rs"]
mod toml_edits;

use std::path::Path;

use proptest::prelude::*;
use rebalancer_controller::config::{Config, ConfigError};
use toml_edits::{apply, edit, no_hang, toml_syntax_error};

fn seeds() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        "../../deploy/etc/rebalancerd.toml",
        "rebalancerd.example.toml",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(root.join(p)).expect("seed config"))
    .collect()
}

fn check(text: String) {
    let lines = text.lines().count() + 1;
    let syntax = toml_syntax_error(&text);
    match Config::from_str_at(&text, Path::new("fuzz.toml")) {
        Ok(_) => assert!(!syntax, "accepted a text TOML rejects: {text:?}"),
        Err(e) => {
            let shown = e.to_string();
            match &e {
                ConfigError::Parse {
                    line,
                    column,
                    message,
                    ..
                }
                | ConfigError::Invalid {
                    line,
                    column,
                    message,
                    ..
                } => {
                    assert!(
                        (1..=lines).contains(line) && *column >= 1,
                        "position {line}:{column} outside a {lines}-line text: {shown}"
                    );
                    assert!(
                        shown.starts_with(&format!("fuzz.toml:{line}:{column}: ")),
                        "{shown}"
                    );
                    assert!(!message.trim().is_empty(), "empty message: {shown}");
                }
                ConfigError::Read { .. } => panic!("read error from text: {shown}"),
            }
            if syntax {
                assert!(matches!(e, ConfigError::Parse { .. }), "{shown}");
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
        no_hang("controller config", move || check(text))?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        no_hang("controller config text", move || check(text))?;
    }
}

#[test]
fn the_shipped_configurations_parse() {
    for s in seeds() {
        Config::from_str_at(&s, Path::new("c.toml")).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_bare_carriage_return_is_named() {
    let e = Config::from_str_at("\r¡", Path::new("cr.toml")).expect_err("bare CR");
    assert_eq!(
        e.to_string(),
        "cr.toml:1:1: a carriage return must be followed by a newline"
    );
}
