//! Fuzzing every message decode (issue #11): control (plugin, rebalctl ↔ agent), controller
//! control, peer (agent ↔ agent) and the SPANK plugin's registration, behind the framing.
//!
//! Inputs: arbitrary bytes, arbitrary JSON trees over the protocol's own vocabulary, and byte
//! mutations of valid messages (the peer fixtures captured from real agents plus control
//! samples). Properties: no panic; no hang (each case runs under a watchdog); a JSON error
//! names its line and column.
//!
//! The normal `cargo test` runs a bounded number of cases. A long campaign:
//! `PROPTEST_CASES=200000 cargo test --release -p rebalancer-proto --test fuzz_messages`
//! (see docs/security.md, "Fuzzing").

use std::io::Cursor;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rebalancer_proto::control::{ControlRequest, ControlResponse};
use rebalancer_proto::frame::{read_frame, Frame, FrameKind, MAX_FRAME_LEN};
use rebalancer_proto::peer::{PeerRequest, PeerResponse};
use rebalancer_proto::{
    Event, Hello, PreparedTask, Reply, Request, Response, RestorePlan, TaskRegistration,
};

/// A case that takes longer than this is a hang, not a slow decode.
const HANG: Duration = Duration::from_secs(20);

fn cases(default: u32) -> ProptestConfig {
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

/// Runs `f` on another thread and fails the case if it does not finish within [`HANG`].
fn no_hang<F: FnOnce() + Send + 'static>(what: &str, f: F) -> Result<(), TestCaseError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(HANG) {
        Ok(()) => Ok(()),
        // The thread panicked: the sender dropped without a send.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(TestCaseError::fail(format!("{what}: decoding panicked")))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(TestCaseError::fail(format!(
            "{what}: no answer within {} s",
            HANG.as_secs()
        ))),
    }
}

/// Decodes `payload` as every message type; every error must carry a position.
fn decode_everything(payload: &[u8]) {
    fn one<T: serde::de::DeserializeOwned>(payload: &[u8], what: &str) {
        if let Err(e) = serde_json::from_slice::<T>(payload) {
            use serde_json::error::Category;
            match e.classify() {
                // The parser knows where it stopped: the error says so.
                Category::Syntax | Category::Eof => {
                    assert!(
                        e.line() >= 1 && e.column() <= payload.len() + 1,
                        "{what}: error without a position: {e}"
                    );
                    assert!(e.to_string().contains("line"), "{what}: {e}");
                }
                // A wrong type or value. serde buffers the fields of internally tagged enums
                // (`"op"`, `"kind"`) before it decodes the variant, so serde_json has no
                // position left to give for errors found there (line 0); the message must
                // still say what was expected.
                Category::Data => {
                    assert!(
                        e.to_string().contains("expected")
                            || e.to_string().contains("unknown")
                            || e.to_string().contains("missing")
                            || e.to_string().contains("duplicate")
                            || e.to_string().contains("invalid"),
                        "{what}: an error that names nothing: {e}"
                    );
                }
                Category::Io => panic!("{what}: an I/O error from a byte slice: {e}"),
            }
        }
    }
    one::<Hello>(payload, "hello");
    one::<Request>(payload, "request");
    one::<Reply>(payload, "reply");
    one::<Response>(payload, "response");
    one::<Event>(payload, "event");
    one::<TaskRegistration>(payload, "task registration");
    one::<PreparedTask>(payload, "prepared task");
    one::<RestorePlan>(payload, "restore plan");
    one::<ControlRequest>(payload, "controller request");
    one::<ControlResponse>(payload, "controller response");
    one::<PeerRequest>(payload, "peer request");
    one::<PeerResponse>(payload, "peer response");
}

/// Through the framing too: a frame around the payload, then `Frame::decode` per kind.
fn decode_framed(kind: FrameKind, payload: Vec<u8>) {
    let Ok(len) = u32::try_from(payload.len()) else {
        return;
    };
    let f = Frame {
        header: rebalancer_proto::frame::FrameHeader { kind, len, id: 7 },
        payload,
    };
    let bytes = f.to_bytes();
    let Ok(back) = read_frame(&mut Cursor::new(&bytes), MAX_FRAME_LEN) else {
        return;
    };
    let _ = back.decode::<Request>(FrameKind::Request, "request");
    let _ = back.decode::<Hello>(FrameKind::Hello, "hello");
    let _ = back.decode::<Response>(FrameKind::Response, "response");
    let _ = back.decode::<PeerRequest>(FrameKind::Request, "peer request");
    decode_everything(&back.payload);
}

/// Valid messages to mutate: the peer fixtures and control samples.
fn seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for dir in ["peer", "peer-sparse"] {
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(dir);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "json") {
                    if let Ok(b) = std::fs::read(e.path()) {
                        out.push(b);
                    }
                }
            }
        }
    }
    let reg = r#"{"task":{"job_id":42,"step_id":0,"task_id":1},"pid":101,"uid":1000,"gid":1000,"node":"n1","class":null,"mode":"post-copy","cpus":2.0,"memory_limit":1048576,"container":"j42.s0.t1","address":"198.19.0.5","rss_bytes":4096,"waiter_pid":100,"cwd":"/tmp","program":"/bin/sh"}"#;
    for s in [
        r#"{"protocol":1,"software":"x","role":"spank","node":"n1"}"#.to_string(),
        r#"{"op":"ping"}"#.into(),
        r#"{"op":"task-exited","container":"j42.s0.t1","wait_status":9}"#.into(),
        r#"{"op":"kill-container","id":"j42.s0.t1","signal":15}"#.into(),
        r#"{"op":"prepare-restore","migration":"m-1","registration":REG}"#.replace("REG", reg),
        r#"{"op":"register-task","registration":REG}"#.replace("REG", reg),
        r#"{"op":"prepare-task","registration":REG}"#.replace("REG", reg),
        r#"{"op":"migrate","request":{"container":"j42.s0.t1","target":"n2","mode":"stop-and-copy"},"watch":true}"#.into(),
        r#"{"ok":{"kind":"task-finished","wait_status":0,"migrated_to":"n2"}}"#.into(),
        r#"{"error":{"code":"permission_denied","message":"no"}}"#.into(),
        reg.to_string(),
    ] {
        out.push(s.into_bytes());
    }
    out.sort();
    out
}

/// Words the decoders look for, so that random trees reach past the first field.
const WORDS: &[&str] = &[
    "op",
    "kind",
    "ok",
    "error",
    "code",
    "message",
    "protocol",
    "software",
    "role",
    "node",
    "registration",
    "task",
    "job_id",
    "step_id",
    "task_id",
    "pid",
    "uid",
    "gid",
    "container",
    "wait_status",
    "signal",
    "id",
    "migration",
    "request",
    "watch",
    "mode",
    "plan",
    "mounts",
    "source",
    "target",
    "readonly",
    "address",
    "ping",
    "task-exited",
    "kill-container",
    "register-task",
    "prepare-task",
    "prepare-restore",
    "migrate",
    "prepare",
    "images",
    "restore",
    "commit",
    "abort",
    "authenticate",
    "outcome",
    "capabilities",
    "files",
    "name",
    "data",
    "stop-and-copy",
    "post-copy",
    "bind",
    "tmpfs",
    "spank",
    "agent",
    "controller",
];

fn json_tree() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let word = proptest::sample::select(WORDS).prop_map(str::to_string);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        word.clone().prop_map(Value::String),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 96, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(word.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One byte-level mutation of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = b.len().max(1);
        match e {
            Edit::Flip(i, x) => {
                if !b.is_empty() {
                    let i = i % b.len();
                    b[i] ^= x | 1;
                }
            }
            Edit::Insert(i, bytes) => {
                let i = i % (b.len() + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            Edit::Delete(i, k) => {
                let i = i % n;
                let end = (i + k).min(b.len());
                if i < end {
                    b.drain(i..end);
                }
            }
            Edit::Truncate(i) => b.truncate(i % n),
            Edit::Duplicate(i, k) => {
                if !b.is_empty() {
                    let i = i % b.len();
                    let end = (i + k).min(b.len());
                    let part = b[i..end].to_vec();
                    b.splice(end..end, part);
                }
            }
        }
    }
    b
}

fn edit() -> impl Strategy<Value = Edit> {
    let special = proptest::sample::select(vec![
        b"{".to_vec(),
        b"}".to_vec(),
        b"[".to_vec(),
        b"\"".to_vec(),
        b"\\u0000".to_vec(),
        b"\\ud800".to_vec(),
        b"1e999999".to_vec(),
        b"-0".to_vec(),
        b"null".to_vec(),
        b"18446744073709551616".to_vec(),
        b",".to_vec(),
        b":".to_vec(),
        "é".as_bytes().to_vec(),
        vec![0xff, 0xfe],
    ]);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Edit::Flip(i, x)),
        (any::<usize>(), special).prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<usize>(), 1usize..16).prop_map(|(i, k)| Edit::Delete(i, k)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..64).prop_map(|(i, k)| Edit::Duplicate(i, k)),
    ]
}

fn kind() -> impl Strategy<Value = FrameKind> {
    proptest::sample::select(vec![
        FrameKind::Hello,
        FrameKind::Request,
        FrameKind::Response,
        FrameKind::Data,
    ])
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_bytes_decode_as_no_message_without_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        k in kind(),
    ) {
        no_hang("arbitrary bytes", move || {
            decode_everything(&bytes);
            decode_framed(k, bytes);
        })?;
    }

    #[test]
    fn arbitrary_json_trees_over_the_protocol_words_never_panic(
        tree in json_tree(),
        k in kind(),
    ) {
        let bytes = serde_json::to_vec(&tree).expect("a Value encodes");
        no_hang("json tree", move || {
            decode_everything(&bytes);
            decode_framed(k, bytes);
        })?;
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        seed in any::<proptest::sample::Index>(),
        edits in proptest::collection::vec(edit(), 1..6),
        k in kind(),
    ) {
        let seeds = seeds();
        prop_assert!(seeds.len() > 20, "fixtures missing: {}", seeds.len());
        let bytes = apply(seed.get(&seeds).clone(), &edits);
        no_hang("mutated message", move || {
            decode_everything(&bytes);
            decode_framed(k, bytes);
        })?;
    }
}

/// Deeply nested input must neither overflow the stack nor hang: serde_json's recursion limit
/// answers with an error that names the place.
#[test]
fn deep_nesting_is_an_error_with_a_position() {
    for open in ["[", "{\"op\":", "{\"registration\":"] {
        let s = open.repeat(100_000);
        let t = Instant::now();
        let e = serde_json::from_str::<Request>(&s).expect_err("nested");
        eprintln!("{open:?} x 100000: {e} ({:?})", t.elapsed());
        assert!(e.line() >= 1, "{e}");
    }
}
