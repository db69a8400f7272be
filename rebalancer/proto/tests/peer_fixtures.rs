//! The agent ↔ agent JSON shape is frozen: messages captured from the previous release's agents
//! decode with today's types and re-encode to the same bytes (see `fixtures/README.md`).

use std::path::{Path, PathBuf};

use rebalancer_proto::peer::{PeerEvent, PeerReply, PeerRequest, PeerResponse};
use rebalancer_proto::{MountSpec, RootfsSpec};

fn fixtures(dir: &str) -> Vec<(String, Vec<u8>)> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("read {}: {e}", d.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p: PathBuf| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read fixture"))
        })
        .collect();
    out.sort();
    out
}

/// Decodes `bytes` as `T`, re-encodes, and checks both the JSON value and the exact bytes.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str, bytes: &[u8]) -> T {
    let v: T = serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let again = serde_json::to_vec(&v).expect("encode");
    let a: serde_json::Value = serde_json::from_slice(bytes).expect("fixture is JSON");
    let b: serde_json::Value = serde_json::from_slice(&again).expect("encoding is JSON");
    assert_eq!(a, b, "{name}: re-encoding changed the JSON value");
    assert_eq!(
        String::from_utf8_lossy(bytes),
        String::from_utf8_lossy(&again),
        "{name}: re-encoding changed the bytes (field order?)"
    );
    v
}

#[test]
fn every_captured_peer_message_decodes_and_re_encodes_to_the_same_bytes() {
    let all = fixtures("peer");
    let (mut requests, mut replies) = (Vec::new(), Vec::new());
    for (name, bytes) in &all {
        if name.starts_with("request-") {
            requests.push(round_trip::<PeerRequest>(name, bytes));
        } else if name.starts_with("reply-") {
            replies.push(round_trip::<PeerResponse>(name, bytes));
        } else {
            panic!("{name}: fixture names start with request- or reply-");
        }
    }
    // Every variant has a fixture: a new variant without one fails here.
    let mut ops: Vec<&str> = requests.iter().map(PeerRequest::op).collect();
    ops.sort();
    ops.dedup();
    assert_eq!(
        ops,
        [
            "abort",
            "authenticate",
            "capabilities",
            "commit",
            "images",
            "outcome",
            "precopy-round",
            "prepare",
            "restore",
            "task-ended"
        ]
    );
    let mut kinds: Vec<String> = replies
        .iter()
        .map(|r| match r {
            PeerResponse::Ok(k) => serde_json::to_value(k).expect("encode")["kind"]
                .as_str()
                .expect("kind")
                .to_string(),
            PeerResponse::Error(_) => "error".into(),
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "aborted",
            "ack",
            "authenticated",
            "capabilities",
            "committed",
            "error",
            "images-received",
            "outcome",
            "prepared",
            "restored",
            "round-ready"
        ]
    );
}

#[test]
fn the_peer_protocol_4_messages_decode_and_re_encode_to_the_same_bytes() {
    let all = fixtures("peer-v4");
    let mut ops = Vec::new();
    let mut kinds = Vec::new();
    for (name, bytes) in &all {
        if name.starts_with("request-") {
            ops.push(round_trip::<PeerRequest>(name, bytes).op());
        } else if name.starts_with("reply-") {
            match round_trip::<PeerResponse>(name, bytes) {
                PeerResponse::Ok(PeerReply::LazyLinked) => kinds.push("lazy-linked"),
                other => panic!("{name}: not a version-4 reply: {other:?}"),
            }
        } else {
            panic!("{name}: fixture names start with request- or reply-");
        }
    }
    ops.sort();
    assert_eq!(ops, ["lazy-link", "restore"]);
    assert_eq!(kinds, ["lazy-linked"]);
    let (_, link) = &all[1];
    match serde_json::from_slice::<PeerRequest>(link).expect("lazy-link") {
        PeerRequest::LazyLink { to, token } => {
            assert_eq!(to, ("198.18.0.1".parse().expect("ip"), 40123));
            assert_eq!(token.len(), 2 * rebalancer_proto::peer::LAZY_TOKEN_LEN);
        }
        other => panic!("not lazy-link: {other:?}"),
    }
}

#[test]
fn the_lazy_end_question_and_its_answers_decode_and_re_encode_to_the_same_bytes() {
    let all = fixtures("peer-lazy-end");
    let mut ops = Vec::new();
    let mut lost = Vec::new();
    for (name, bytes) in &all {
        if name.starts_with("request-") {
            ops.push(round_trip::<PeerRequest>(name, bytes).op());
        } else if name.starts_with("reply-") {
            match round_trip::<PeerResponse>(name, bytes) {
                PeerResponse::Ok(PeerReply::LazyEnded { lost: l }) => lost.push(l.is_some()),
                other => panic!("{name}: not a lazy-end answer: {other:?}"),
            }
        } else {
            panic!("{name}: fixture names start with request- or reply-");
        }
    }
    assert_eq!(ops, ["lazy-end"]);
    // Sorted by name: `reply-lazy-ended-lost.json`, then `reply-lazy-ended.json`.
    assert_eq!(lost, [true, false]);
}

#[test]
fn the_full_prepare_carries_every_part_of_the_container() {
    let (_, bytes) = fixtures("peer")
        .into_iter()
        .find(|(n, _)| n == "request-prepare-full.json")
        .expect("fixture");
    let PeerRequest::Prepare {
        meta,
        restore_step,
        tls_cert,
        rss_bytes,
        ..
    } = serde_json::from_slice(&bytes).expect("decode")
    else {
        panic!("not a prepare");
    };
    assert!(restore_step);
    assert_eq!(rss_bytes, 33_554_432);
    assert!(tls_cert.is_some_and(|c| c.contains("BEGIN CERTIFICATE")));
    assert_eq!(meta.address.to_string(), "198.18.10.7");
    assert_eq!(meta.spec.rootfs, RootfsSpec::Host);
    assert_eq!(meta.spec.memory_limit, Some(268_435_456));
    assert_eq!(meta.spec.cpus, Some(1.5));
    assert_eq!(meta.mounts.len(), 5);
    assert_eq!(
        meta.mounts[1],
        MountSpec::Bind {
            source: "/home/alice/work".into(),
            target: "/home/alice/work".into(),
            readonly: false
        }
    );
    assert_eq!(meta.mounts[3], MountSpec::Proc);
    assert_eq!(meta.stdio_keys[0], "file[2a:1234]");
    assert_eq!(meta.stdio_paths[0], "/home/alice/work/in.txt");
}

#[test]
fn a_sparse_prepare_of_an_older_sender_decodes_with_the_defaults() {
    for (name, bytes) in fixtures("peer-sparse") {
        let r: PeerRequest =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let PeerRequest::Prepare {
            meta,
            restore_step,
            source_addr,
            rss_bytes,
            tls_cert,
            ..
        } = r
        else {
            panic!("{name}: not a prepare");
        };
        assert!(!restore_step, "{name}");
        assert_eq!(
            (source_addr, rss_bytes, tls_cert),
            (None, 0, None),
            "{name}"
        );
        assert!(meta.stdio_paths.is_empty(), "{name}");
    }
}

#[test]
fn a_reply_of_an_unknown_kind_is_refused() {
    let e = serde_json::from_str::<PeerResponse>(r#"{"ok":{"kind":"teleported"}}"#)
        .expect_err("unknown kind");
    assert!(e.to_string().contains("teleported"), "{e}");
    let ok: PeerResponse = serde_json::from_str(r#"{"ok":{"kind":"ack"}}"#).expect("ack");
    assert_eq!(ok, PeerResponse::Ok(PeerReply::Ack));
}

#[test]
fn the_fencing_fields_decode_where_this_release_sends_them() {
    let all = fixtures("peer");
    let get = |n: &str| -> PeerRequest {
        let (_, b) = all
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("fixture {n}"));
        serde_json::from_slice(b).expect("decode")
    };
    const EPOCH: u64 = 1_765_110_000_123_456_789;
    assert!(matches!(
        get("request-prepare-fenced.json"),
        PeerRequest::Prepare {
            epoch: Some(EPOCH),
            timeout_ms: Some(600_000),
            ..
        }
    ));
    assert!(matches!(
        get("request-commit-fenced.json"),
        PeerRequest::Commit {
            migration: Some(_),
            epoch: Some(EPOCH)
        }
    ));
    assert!(matches!(
        get("request-outcome-fenced.json"),
        PeerRequest::Outcome {
            epoch: Some(EPOCH),
            ..
        }
    ));
    // The previous release's commit carries neither.
    assert_eq!(
        get("request-commit.json"),
        PeerRequest::Commit {
            migration: None,
            epoch: None
        }
    );
}

#[test]
fn the_heartbeat_agreement_and_events_keep_their_shape() {
    let all = fixtures("peer");
    let get = |n: &str| -> Vec<u8> {
        all.iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("fixture {n}"))
            .1
            .clone()
    };
    assert!(matches!(
        serde_json::from_slice(&get("request-prepare-heartbeat.json")).expect("decode"),
        PeerRequest::Prepare {
            heartbeat_ms: Some(2000),
            timeout_ms: Some(600_000),
            ..
        }
    ));
    assert!(matches!(
        serde_json::from_slice(&get("reply-prepared-heartbeat.json")).expect("decode"),
        PeerResponse::Ok(PeerReply::Prepared {
            heartbeat_ms: Some(2000),
            ..
        })
    ));
    // A prepare of the previous release carries no heartbeat: the destination sends none.
    assert!(matches!(
        serde_json::from_slice(&get("request-prepare-fenced.json")).expect("decode"),
        PeerRequest::Prepare {
            heartbeat_ms: None,
            ..
        }
    ));
    for (name, bytes) in fixtures("peer-events") {
        let ev = round_trip::<PeerEvent>(&name, &bytes);
        assert_eq!(
            ev,
            PeerEvent::Heartbeat {
                phase: "dump".into(),
                bytes: 1 << 20
            },
            "{name}"
        );
        // An agent of an earlier release reads event frames as control events: it cannot, and
        // drops them (the channel's rule), so heartbeats never disturb it.
        assert!(
            serde_json::from_slice::<rebalancer_proto::Event>(&bytes).is_err(),
            "{name}"
        );
    }
}

#[test]
fn the_page_server_opening_decodes_and_re_encodes_to_the_same_bytes() {
    let all = fixtures("peer-open-ps");
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "reply-prepared-opens.json",
            "request-open-page-server.json",
            "request-prepare-opens.json"
        ]
    );
    assert!(matches!(
        round_trip::<PeerResponse>(&all[0].0, &all[0].1),
        PeerResponse::Ok(PeerReply::Prepared {
            opens_page_servers: true,
            heartbeat_ms: Some(2000),
            ..
        })
    ));
    assert_eq!(
        round_trip::<PeerRequest>(&all[1].0, &all[1].1),
        PeerRequest::OpenPageServer { port: 27100 }
    );
    assert!(matches!(
        round_trip::<PeerRequest>(&all[2].0, &all[2].1),
        PeerRequest::Prepare {
            opens_page_servers: true,
            ..
        }
    ));
    // The previous release's prepare and prepared carry no such field: page servers listen at
    // once, as they did.
    for (name, bytes) in fixtures("peer") {
        if name.starts_with("request-prepare") {
            let r: PeerRequest = serde_json::from_slice(&bytes).expect("decode");
            assert!(
                matches!(
                    r,
                    PeerRequest::Prepare {
                        opens_page_servers: false,
                        ..
                    }
                ),
                "{name}"
            );
        } else if name.starts_with("reply-prepared") {
            let r: PeerResponse = serde_json::from_slice(&bytes).expect("decode");
            assert!(
                matches!(
                    r,
                    PeerResponse::Ok(PeerReply::Prepared {
                        opens_page_servers: false,
                        ..
                    })
                ),
                "{name}"
            );
        }
    }
}
