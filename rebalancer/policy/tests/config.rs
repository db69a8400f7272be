//! Policy files: shipped policies, positioned errors, directory loading and reload.

mod common;

use std::path::{Path, PathBuf};

use rebalancer_policy::{
    load_dir, load_sources, Action, Basis, MigrationMode, PolicyKind, PolicyStore, ReloadOutcome,
};

fn problems(files: &[(&str, &str)]) -> Vec<String> {
    match load_sources(files) {
        Ok(_) => panic!("expected problems"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

/// A fresh, empty directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rebalancer-policy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

#[test]
fn shipped_policies_load_in_priority_order() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let set = load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<_> = set.policies().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["drain", "thermal", "load"]);
    let load = set.get("load").expect("load policy");
    assert_eq!(load.trigger.basis, Basis::Deviation);
    assert_eq!(load.action, Action::Recommend);
    let drain = set.get("drain").expect("drain policy");
    assert_eq!(drain.action, Action::Automatic);
    assert_eq!(
        drain.migration.modes,
        [MigrationMode::PostCopy, MigrationMode::StopAndCopy]
    );
}

#[test]
fn defaults_apply_per_kind() {
    let set = common::set(&[("t.toml", "kind = \"thermal\"\n[trigger]\nhigh = 80\n")]);
    let p = &set.policies()[0];
    assert_eq!(p.name, "t", "name defaults to the file stem");
    assert_eq!(p.kind, PolicyKind::Thermal);
    assert_eq!(p.action, Action::Recommend, "automatic must be asked for");
    assert_eq!(p.trigger.low, 80.0, "low defaults to high");
    assert_eq!(p.trigger.samples, 3);
    assert_eq!(p.selection.max_per_node, 1);
    assert_eq!(p.limits.job_cooldown_s, 600);
}

#[test]
fn unknown_key_reports_exact_position() {
    let text = "name = \"t\"\nkind = \"thermal\"\n[trigger]\nhigh = 85.0\n  hgih = 3\n";
    let p = problems(&[("pol/t.toml", text)]);
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with(
            "pol/t.toml:5:3: unknown key `hgih` in [trigger]; expected one of `states`"
        ),
        "{}",
        p[0]
    );
}

#[test]
fn every_unknown_key_is_listed_not_just_the_first() {
    let text = "kind = \"load\"\nprioriy = 3\ntrigger = { high = 1, hgih = 2 }\n[limits]\nmax_concurent = 2\njob_cooldown_s = 1\n[scope.extra]\nx = 1\n";
    let p = problems(&[("t.toml", text)]);
    let heads: Vec<&str> = p
        .iter()
        .map(|l| l.split(';').next().unwrap_or(""))
        .collect();
    assert_eq!(
        heads,
        [
            "t.toml:2:1: unknown key `prioriy`",
            "t.toml:3:23: unknown key `hgih` in [trigger]",
            "t.toml:5:1: unknown key `max_concurent` in [limits]",
            "t.toml:7:8: unknown key `extra` in [scope]",
        ]
    );
}

#[test]
fn wrong_type_and_unknown_kind_report_the_value_position() {
    let p = problems(&[
        ("a.toml", "kind = \"thermal\"\n[trigger]\nhigh = \"hot\"\n"),
        ("b.toml", "name = \"b\"\nkind = \"hot\"\n"),
    ]);
    assert_eq!(
        p,
        [
            "a.toml:3:8: invalid type: string \"hot\", expected a number",
            "b.toml:2:8: unknown variant `hot`, expected one of `drain`, `thermal`, `load`",
        ]
    );
}

#[test]
fn syntax_errors_and_integer_types_are_positioned() {
    let p = problems(&[
        ("a.toml", "kind = \"drain\"\n[limits\nmax_concurrent = 1\n"),
        ("b.toml", "kind = \"drain\"\nkind = \"load\"\n"),
        (
            "c.toml",
            "kind = \"load\"\n[trigger]\nhigh = 1\nsamples = 2.5\n",
        ),
    ]);
    assert_eq!(
        p,
        [
            "a.toml:2:8: invalid table header; expected `.`, `]`",
            "b.toml:2:1: duplicate key `kind` in document root",
            "c.toml:4:11: invalid type: floating point `2.5`, expected an integer",
        ]
    );
}

#[test]
fn every_validation_problem_is_listed_with_its_position() {
    let text = r#"name = "t"
kind = "thermal"
[trigger]
high = 80
low = 90
samples = 0
[scope]
nodes = ["n[1-4]", "n[3-1]"]
[migration]
modes = ["post-copy", "post-copy"]
[limits]
max_per_cycle = 0
"#;
    let p = problems(&[("t.toml", text)]);
    assert_eq!(
        p,
        [
            "t.toml:5:7: `low` (90) must not exceed `high` (80); the band is low..high",
            "t.toml:6:11: `samples` must be at least 1, got 0",
            "t.toml:8:20: range `3-1` runs backwards in node pattern `n[3-1]`",
            "t.toml:10:23: `modes` lists post-copy twice",
            "t.toml:12:17: `max_per_cycle` must be at least 1, got 0",
        ]
    );
}

#[test]
fn kind_specific_keys_are_checked() {
    let p = problems(&[
        ("d.toml", "kind = \"drain\"\n[trigger]\nhigh = 3\n"),
        (
            "l.toml",
            "kind = \"load\"\n[trigger]\nstates = [\"down\"]\nhigh = 1\n",
        ),
        ("m.toml", "kind = \"load\"\n[trigger]\nlow = 1\n"),
        (
            "n.toml",
            "kind = \"drain\"\n[destination]\ntemperature_headroom_c = 3\n",
        ),
    ]);
    assert_eq!(
        p,
        [
            "d.toml:3:8: `high` does not apply to a drain policy (use `states`)",
            "l.toml:3:10: `states` applies only to drain policies, not load",
            "m.toml:2:1: a load policy needs `high` in [trigger]",
            "n.toml:3:26: `temperature_headroom_c` applies only to thermal policies, not drain (use `max_temperature_c`)",
        ]
    );
}

#[test]
fn duplicate_names_across_files_are_reported() {
    let p = problems(&[
        ("a.toml", "name = \"x\"\nkind = \"drain\"\n"),
        ("b.toml", "kind = \"drain\"\n\nname = \"x\"\n"),
    ]);
    assert_eq!(
        p,
        ["b.toml:3:8: duplicate policy name \"x\" (first defined at a.toml:1:8)"]
    );
}

#[test]
fn load_dir_reads_only_toml_files_and_reports_each_bad_file() {
    let d = temp_dir("dir");
    std::fs::write(d.join("a.toml"), "kind = \"drain\"\n").expect("write");
    std::fs::write(d.join("notes.txt"), "not a policy").expect("write");
    std::fs::write(d.join(".hidden.toml"), "garbage").expect("write");
    let set = load_dir(&d).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.len(), 1);

    std::fs::write(d.join("b.toml"), "kind = \"drain\"\nbogus = 1\n").expect("write");
    std::fs::write(d.join("c.toml"), "kind = \"load\"\n").expect("write");
    let err = load_dir(&d).expect_err("two bad files");
    let lines: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].ends_with("b.toml:2:1: unknown key `bogus`; expected one of `name`, `kind`, `enabled`, `action`, `priority`, `description`, `trigger`, `scope`, `selection`, `destination`, `migration`, `limits`"), "{}", lines[0]);
    assert!(
        lines[1].ends_with("c.toml:1:1: a load policy needs a [trigger] table with `high`"),
        "{}",
        lines[1]
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn reload_keeps_the_last_good_set() {
    let d = temp_dir("reload");
    std::fs::write(
        d.join("drain.toml"),
        "kind = \"drain\"\naction = \"automatic\"\n",
    )
    .expect("write");
    let mut store = PolicyStore::open(&d).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.generation(), 1);
    assert_eq!(store.reload(), Ok(ReloadOutcome::Unchanged));

    std::fs::write(
        d.join("drain.toml"),
        "kind = \"drain\"\naction = \"sometimes\"\n",
    )
    .expect("write");
    let err = store.reload().expect_err("bad action");
    assert_eq!(err.problems[0].position, Some((2, 10)));
    let cur = store.current();
    assert_eq!(cur.len(), 1);
    assert_eq!(
        cur.policies()[0].action,
        Action::Automatic,
        "last good set kept"
    );
    assert_eq!(store.generation(), 1);
    assert!(store.last_error().is_some());

    std::fs::write(
        d.join("drain.toml"),
        "kind = \"drain\"\naction = \"dry-run\"\n",
    )
    .expect("write");
    assert_eq!(store.reload(), Ok(ReloadOutcome::Replaced { policies: 1 }));
    assert_eq!(store.current().policies()[0].action, Action::DryRun);
    assert_eq!(store.generation(), 2);
    assert!(store.last_error().is_none());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn missing_directory_is_an_error_not_a_panic() {
    let err = load_dir(Path::new("/nonexistent/rebalancer-policies")).expect_err("missing dir");
    assert_eq!(err.problems.len(), 1);
    assert!(err
        .to_string()
        .starts_with("/nonexistent/rebalancer-policies: cannot read"));
}

#[test]
fn auto_is_not_a_mode_a_policy_lists() {
    let src = "kind = \"drain\"\n[migration]\nmodes = [\"post-copy\", \"auto\"]\n";
    let err = load_sources(&[("p.toml", src)]).expect_err("auto refused");
    let lines: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("p.toml:3:23: `modes` lists auto"),
        "{}",
        lines[0]
    );
}
