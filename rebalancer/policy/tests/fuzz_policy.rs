//! Fuzzing the policy TOML (issue #11): mutations of the shipped policies (policies/*.toml)
//! and arbitrary text. Properties: no panic, no hang; a text the TOML parser rejects is refused
//! with a problem at a line and column inside the text; every position given is inside it.
//!
//! Campaign: `PROPTEST_CASES=20000 cargo test --release -p rebalancer-policy --test fuzz_policy`.

#[path = "../../../fuzz/toml_edits.rs"]
mod toml_edits;

use std::path::Path;

use proptest::prelude::*;
use rebalancer_policy::config::parse_policy;
use toml_edits::{apply, edit, no_hang, toml_syntax_error};

fn seeds() -> Vec<String> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let mut out: Vec<String> = std::fs::read_dir(&d)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn check(text: String) {
    let path = Path::new("fuzz.toml");
    let lines = text.lines().count() + 1;
    let syntax = toml_syntax_error(&text);
    match parse_policy(path, &text) {
        Ok(p) => assert!(
            !syntax,
            "accepted a text TOML rejects: {text:?} -> {}",
            p.name
        ),
        Err(problems) => {
            assert!(!problems.is_empty(), "Err with no problem for {text:?}");
            for p in &problems {
                if let Some((line, col)) = p.position {
                    assert!(
                        (1..=lines).contains(&line) && col >= 1,
                        "position {line}:{col} outside a {lines}-line text: {p}"
                    );
                    assert!(
                        p.to_string()
                            .starts_with(&format!("fuzz.toml:{line}:{col}: ")),
                        "{p}"
                    );
                }
                assert!(
                    !p.message.trim().is_empty(),
                    "empty message at {:?}",
                    p.position
                );
            }
            if syntax {
                assert!(
                    problems.iter().any(|p| p.position.is_some()),
                    "a syntax error without a position: {problems:?}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(toml_edits::config(256))]

    #[test]
    fn mutated_policies_never_panic_and_errors_have_places(
        seed in any::<proptest::sample::Index>(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        prop_assert!(seeds.len() >= 3, "policies/*.toml missing");
        let text = apply(seed.get(&seeds).as_str(), &edits);
        no_hang("policy", move || check(text))?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        no_hang("policy text", move || check(text))?;
    }
}

#[test]
fn the_shipped_policies_parse() {
    for s in seeds() {
        parse_policy(Path::new("p.toml"), &s).unwrap_or_else(|e| panic!("{e:?}"));
    }
}

/// Found by this fuzz test: the TOML parser gives a bare carriage return a position but an
/// empty message.
#[test]
fn a_bare_carriage_return_is_named() {
    let e = parse_policy(Path::new("cr.toml"), "\r¡").expect_err("bare CR");
    assert_eq!(
        e[0].to_string(),
        "cr.toml:1:1: a carriage return must be followed by a newline"
    );
}
