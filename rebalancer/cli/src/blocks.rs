//! `rebalctl show blocks [NODE | node=NODE]`: the container address blocks the controller
//! leased, one scontrol-style line per block (`--json`: the list of `BlockStatus`).

use rebalancer_proto::control::{BlockStatus, ControlRequest};

use crate::render;

/// The request for `show blocks`, with the node named as a word or as `node=`.
pub fn request(node: Option<String>) -> ControlRequest {
    ControlRequest::ShowBlocks { node }
}

/// `Block=198.19.0.64/26 Node=node2 LeasedAt=2026-12-07T18:10:00Z Addresses=64 Live=3 Lent=1`
/// per block, in block order; `LeasedAt=Unknown` for a lease older than the time's record.
pub fn render(blocks: &[BlockStatus]) -> String {
    if blocks.is_empty() {
        return "no address blocks leased\n".into();
    }
    blocks
        .iter()
        .map(|b| {
            let at = b
                .leased_at
                .map(render::time)
                .unwrap_or_else(|| "Unknown".into());
            format!(
                "Block={} Node={} LeasedAt={at} Addresses={} Live={} Lent={}\n",
                b.block, b.node, b.addresses, b.live, b.lent
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(block: &str, node: &str, at: Option<u64>, live: u32, lent: u32) -> BlockStatus {
        BlockStatus {
            block: block.into(),
            node: node.into(),
            leased_at: at,
            addresses: 64,
            live,
            lent,
        }
    }

    #[test]
    fn one_line_per_block_with_its_node_time_and_counts() {
        let text = render(&[
            block("198.19.0.0/26", "node1", Some(1_796_666_400_000), 2, 1),
            block("198.19.0.64/26", "node2", None, 0, 0),
        ]);
        assert_eq!(
            text,
            "Block=198.19.0.0/26 Node=node1 LeasedAt=2026-12-07T18:00:00Z Addresses=64 Live=2 Lent=1\n\
             Block=198.19.0.64/26 Node=node2 LeasedAt=Unknown Addresses=64 Live=0 Lent=0\n"
        );
    }

    #[test]
    fn the_node_is_a_word_or_node_equals_and_nothing_else_is_taken() {
        use crate::args::{parse_show, ShowWhat};
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for w in [&["node2"][..], &["node=node2"], &["NodeName=node2"]] {
            let (name, _) = parse_show(ShowWhat::Blocks, &words(w)).expect("parsed");
            assert_eq!(
                request(name),
                ControlRequest::ShowBlocks {
                    node: Some("node2".into())
                },
                "{w:?}"
            );
        }
        let (name, _) = parse_show(ShowWhat::Blocks, &[]).expect("parsed");
        assert_eq!(request(name), ControlRequest::ShowBlocks { node: None });
        let e = parse_show(ShowWhat::Blocks, &words(&["state=up"])).expect_err("no state=");
        assert!(e.contains("state"), "{e}");
    }

    #[test]
    fn no_blocks_says_so() {
        assert_eq!(render(&[]), "no address blocks leased\n");
    }
}
