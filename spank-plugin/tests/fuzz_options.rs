//! Fuzzing the SPANK plugin's option strings (issue #11): the plugstack.conf arguments
//! (`Config::parse`) and the user's `--migratable[=CLASS]`, `--migration-mode`, `--no-migrate`
//! and hidden `--rebalancer-restore=ID` (`UserOptions::apply`). Properties: no panic; a refused
//! argument is named in the error; what is accepted obeys the documented grammar (a class, a
//! migration id that can never be a path); `--no-migrate` never coexists with a request to move.
//!
//! Campaign: `PROPTEST_CASES=100000 cargo test --release -p slurm-rebalancer-spank --test fuzz_options`.

use proptest::prelude::*;
use slurm_rebalancer_spank::config::{parse_class, parse_migration_id, Config, OptId, UserOptions};

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/run/rb/%n/agent.sock".to_string()),
        Just("batch".to_string()),
        Just("post-copy".to_string()),
        Just("stop-and-copy".to_string()),
        Just("auto".to_string()),
        Just("yes".to_string()),
        Just("0".to_string()),
        Just("600".to_string()),
        Just("601".to_string()),
        Just("../../etc".to_string()),
        Just("0123abcd-0000-4000-8000-00000000beef".to_string()),
        "/[a-z/%.]{0,140}".prop_map(|s| s.to_string()),
        "[ -~]{0,70}".prop_map(|s| s.to_string()),
        ".{0,20}".prop_map(|s| s.to_string()),
    ]
}

fn arg() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("socket"),
        Just("default_class"),
        Just("default_mode"),
        Just("enforce"),
        Just("timeout"),
        Just("verbose"),
        Just(""),
    ];
    prop_oneof![
        4 => (key, value()).prop_map(|(k, v)| format!("{k}={v}")),
        1 => value(),
    ]
}

fn class_grammar(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn plugin_arguments_parse_or_name_the_offender(args in proptest::collection::vec(arg(), 0..6)) {
        match Config::parse(&args) {
            Ok(c) => {
                prop_assert!(c.socket.starts_with('/'));
                prop_assert!((1..=600).contains(&c.timeout.as_secs()));
                if let Some(class) = &c.default_class {
                    prop_assert!(class_grammar(class), "{class:?}");
                }
            }
            Err(e) => {
                let shown = e.to_string();
                let named = args.iter().any(|a| {
                    let key = a.split_once('=').map_or(a.as_str(), |(k, _)| k);
                    shown.contains(&format!("'{a}'"))
                        || shown.contains(&format!("'{key}'"))
                        || (!key.is_empty() && shown.contains(key))
                });
                prop_assert!(named, "{shown} names none of {args:?}");
            }
        }
    }

    #[test]
    fn user_options_keep_their_rules(
        ops in proptest::collection::vec((1i32..=5, proptest::option::of(value())), 0..8),
    ) {
        let mut u = UserOptions::default();
        for (id, arg) in &ops {
            let Some(id) = OptId::from_val(*id) else { continue };
            let before = u.clone();
            if let Err(e) = u.apply(id, arg.as_deref()) {
                prop_assert!(!e.to_string().is_empty());
                // A refused option changes nothing.
                prop_assert_eq!(&u, &before);
            }
            prop_assert!(!(u.no_migrate && (u.migratable.is_some() || u.mode.is_some())), "{u:?}");
            if let Some(Some(class)) = &u.migratable {
                prop_assert!(class_grammar(class), "{class:?}");
            }
            if let Some(id) = &u.restore {
                prop_assert!(!id.is_empty() && !id.contains('/') && !id.contains('.'), "{id:?}");
            }
        }
    }

    #[test]
    fn the_class_and_id_grammars_are_exact(s in "[ -~]{0,70}|.{0,8}") {
        prop_assert_eq!(parse_class(&s).is_ok(), class_grammar(&s), "{:?}", s);
        let id_ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        prop_assert_eq!(parse_migration_id(&s).is_ok(), id_ok, "{:?}", s);
        if let Err(e) = parse_class(&s) {
            let want = format!("'{s}'");
            prop_assert!(e.to_string().contains(&want), "{}", e);
        }
    }
}
