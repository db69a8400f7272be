//! Line- and token-level mutations of TOML texts for the configuration and policy fuzz tests
//! (included with `#[path]` by rebalancer/{policy,controller,agent}/tests/fuzz_*.rs). A
//! mutation keeps most of a valid file, so cases reach validation and not only the parser.

use proptest::prelude::*;

/// One edit of a TOML text.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Delete line i.
    DropLine(usize),
    /// Copy line i after line j (duplicate keys and tables).
    CopyLine(usize, usize),
    /// Replace the value of the i-th `key = value` line.
    Value(usize, String),
    /// Insert a line at i.
    Insert(usize, String),
    /// Cut the text at byte i (on a character boundary).
    Truncate(usize),
    /// Flip a byte (then repaired to valid UTF-8 lossily).
    Flip(usize, u8),
}

fn values() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("18446744073709551616".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("true".to_string()),
        Just("\"\"".to_string()),
        Just("\"../../etc/shadow\"".to_string()),
        Just("\"/\"".to_string()),
        Just("\"198.18.0.1:7878\"".to_string()),
        Just("\"0.0.0.0:0\"".to_string()),
        Just("\"198.19.0.0/33\"".to_string()),
        Just("[]".to_string()),
        Just("[1, \"a\"]".to_string()),
        Just("{}".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        "\"[ -~]{0,24}\"".prop_map(|s| s.replace('\\', "/")),
        "[a-z_]{1,12}".prop_map(|s| s.to_string()),
    ]
}

fn lines() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,16} = 1".prop_map(|s| s.to_string()),
        "\\[[a-z_.]{1,16}\\]".prop_map(|s| s.to_string()),
        "\\[\\[[a-z_]{1,12}\\]\\]".prop_map(|s| s.to_string()),
        Just("=".to_string()),
        Just("a = ".to_string()),
        Just("\"unterminated".to_string()),
        Just("'''".to_string()),
        Just("[".to_string()),
        Just("a.b.c = 1".to_string()),
        ".{0,40}".prop_map(|s| s.to_string()),
    ]
}

pub fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::DropLine),
        (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Edit::CopyLine(i, j)),
        (any::<usize>(), values()).prop_map(|(i, v)| Edit::Value(i, v)),
        (any::<usize>(), values()).prop_map(|(i, v)| Edit::Value(i, v)),
        (any::<usize>(), lines()).prop_map(|(i, l)| Edit::Insert(i, l)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Edit::Flip(i, x)),
    ]
}

pub fn apply(text: &str, edits: &[Edit]) -> String {
    let mut t = text.to_string();
    for e in edits {
        let mut ls: Vec<String> = t.lines().map(str::to_string).collect();
        let n = ls.len().max(1);
        match e {
            Edit::DropLine(i) => {
                if !ls.is_empty() {
                    ls.remove(i % ls.len());
                }
            }
            Edit::CopyLine(i, j) => {
                if !ls.is_empty() {
                    let l = ls[i % ls.len()].clone();
                    ls.insert((j % n + 1).min(ls.len()), l);
                }
            }
            Edit::Value(i, v) => {
                let kv: Vec<usize> = (0..ls.len())
                    .filter(|k| ls[*k].contains('=') && !ls[*k].trim_start().starts_with('#'))
                    .collect();
                if !kv.is_empty() {
                    let k = kv[i % kv.len()];
                    let key = ls[k].split('=').next().unwrap_or("").to_string();
                    ls[k] = format!("{key}= {v}");
                }
            }
            Edit::Insert(i, l) => ls.insert(i % (ls.len() + 1), l.clone()),
            Edit::Truncate(i) => {
                let mut cut = i % (t.len() + 1);
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
                continue;
            }
            Edit::Flip(i, x) => {
                let mut b = t.into_bytes();
                if !b.is_empty() {
                    let k = i % b.len();
                    b[k] ^= x | 1;
                }
                t = String::from_utf8_lossy(&b).into_owned();
                continue;
            }
        }
        t = ls.join("\n");
        t.push('\n');
    }
    t
}

/// The case count: `PROPTEST_CASES` for a campaign, `default` in the normal `cargo test`.
pub fn config(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `f` on another thread; a panic or no answer within 20 s fails the case.
pub fn no_hang<F: FnOnce() + Send + 'static>(what: &str, f: F) -> Result<(), TestCaseError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(()) => Ok(()),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(TestCaseError::fail(format!("{what}: panicked")))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(TestCaseError::fail(format!(
            "{what}: no answer within 20 s"
        ))),
    }
}

/// Whether the TOML parser itself rejects `text` (syntax, not our validation).
pub fn toml_syntax_error(text: &str) -> bool {
    text.parse::<toml::Table>().is_err()
}
