//! docs/man/rebalctl.1 documents every command and every kind of `show` that rebalctl has: the
//! lists are read from rebalctl's own `--help`, so a new command without its man page entry
//! fails here.

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rebalctl"))
        .args(args)
        .output()
        .expect("run rebalctl");
    assert!(out.status.success(), "rebalctl {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first word of each item of the section that starts with `header`: lines indented
/// `indent` spaces and starting with `item` (wrapped text is indented further).
fn section_words(text: &str, header: &str, indent: usize, item: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.len() - l.trim_start().len() == indent)
        .filter_map(|l| l.trim_start().strip_prefix(item))
        .filter_map(|l| l.split([' ', ':']).next())
        .map(str::to_string)
        .collect()
}

/// The man page's COMMANDS entries: the line after each `.TP`, with roff's font escapes gone.
fn entries(man: &str) -> Vec<String> {
    let body: Vec<&str> = man
        .lines()
        .skip_while(|l| *l != ".SH COMMANDS")
        .take_while(|l| *l != ".SH OPTIONS")
        .collect();
    body.windows(2)
        .filter(|w| w[0] == ".TP")
        .map(|w| {
            w[1].trim_start_matches(".B ")
                .replace("\\fB", "")
                .replace("\\fR", "")
                .replace("\\fI", "")
                .replace("\\-", "-")
        })
        .collect()
}

#[test]
fn every_command_and_every_kind_of_show_has_a_man_page_entry() {
    let man = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/man/rebalctl.1"),
    )
    .expect("read docs/man/rebalctl.1");
    let entries = entries(&man);
    let commands = section_words(&help(&["--help"]), "Commands:", 2, "");
    assert!(
        commands.len() >= 10,
        "commands read from --help: {commands:?}"
    );
    let kinds = section_words(&help(&["show", "--help"]), "Possible values:", 10, "- ");
    assert!(
        kinds.contains(&"nodes".to_string()),
        "kinds read: {kinds:?}"
    );
    let mut missing = Vec::new();
    for c in commands.iter().filter(|c| *c != "help" && *c != "show") {
        if !entries
            .iter()
            .any(|e| e.split(' ').next() == Some(c.as_str()))
        {
            missing.push(c.clone());
        }
    }
    for k in &kinds {
        let want = format!("show {k}");
        if !entries.iter().any(|e| e.starts_with(&want)) {
            missing.push(want);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/man/rebalctl.1 has no COMMANDS entry for {missing:?} (entries: {entries:#?})"
    );
}
