//! Controller ↔ agent control messages added since the peer fixtures were frozen (the address
//! block lease, `address-blocks`): each fixture decodes and re-encodes to the same bytes, so a
//! change of their JSON shape fails here (see `fixtures/README.md`).

use std::path::Path;

use rebalancer_proto::{BlockLease, IpamMode, Reply, Request, Response};

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/control")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str) -> T {
    let bytes = fixture(name);
    let v: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let again = serde_json::to_vec(&v).expect("encode");
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        String::from_utf8_lossy(&again),
        "{name}: re-encoding changed the bytes"
    );
    v
}

#[test]
fn the_address_block_messages_keep_their_shape() {
    let Request::AddressBlocks { lease } = round_trip::<Request>("request-address-blocks.json")
    else {
        panic!("request-address-blocks.json is not address-blocks");
    };
    assert_eq!(lease.blocks, [0, 3]);
    assert_eq!(lease.released, ["198.19.0.200"]);
    let Request::AddressBlocks { lease } =
        round_trip::<Request>("request-address-blocks-first.json")
    else {
        panic!("not address-blocks");
    };
    assert!(lease.blocks.is_empty() && lease.released.is_empty());

    let Response::Ok(Reply::AddressBlocks { blocks }) =
        round_trip::<Response>("reply-address-blocks.json")
    else {
        panic!("reply-address-blocks.json is not an address-blocks reply");
    };
    assert_eq!(
        (blocks.mode, blocks.free, blocks.used),
        (IpamMode::Leased, 120, 5)
    );
    assert_eq!(blocks.lent[0].container, "j7.s0.t0");
    let Response::Ok(Reply::AddressBlocks { blocks }) =
        round_trip::<Response>("reply-address-blocks-local.json")
    else {
        panic!("not an address-blocks reply");
    };
    assert_eq!(blocks.mode, IpamMode::Local);
    let Response::Ok(Reply::AddressBlocks { blocks }) =
        round_trip::<Response>("reply-address-blocks-first.json")
    else {
        panic!("not an address-blocks reply");
    };
    assert!(blocks.want_block && blocks.blocks.is_empty());
}

#[test]
fn a_lease_without_the_optional_fields_decodes_with_their_defaults() {
    let v = serde_json::json!({"op": "address-blocks",
        "lease": {"pool": "198.19.0.0/20", "block_prefix": 26, "blocks": [1]}});
    let Request::AddressBlocks { lease } = serde_json::from_value(v).expect("decode") else {
        panic!("not address-blocks");
    };
    assert_eq!(
        lease,
        BlockLease {
            pool: "198.19.0.0/20".into(),
            block_prefix: 26,
            blocks: vec![1],
            released: vec![],
            low_water: 0,
        }
    );
}
