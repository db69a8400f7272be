//! Pure migration decisions: which mode, when pre-copy stops, whether the destination has room.

use rebalancer_proto::{DowntimeModel, MigrationMode};

use crate::error::AgentError;

/// A migration id from a peer, before it names a directory: 1 to 64 ASCII letters, digits and
/// dashes (the source makes UUIDs). Pure.
pub fn check_migration_id(id: &str) -> Result<(), AgentError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(AgentError::BadRequest(format!(
            "migration id {:?} is not 1-64 letters, digits and dashes",
            id.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// A migration's fencing token, derived from its id (so that a restarted source, whose
/// journal holds the id, names the same epoch): FNV-1a of the id, never 0. Pure.
pub fn epoch_of(migration: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in migration.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// Whether this node can take a container of `rss` bytes: stop-and-copy and pre-copy hold the
/// pages twice for a while (tmpfs images and the restored copy), post-copy once; plus 256 MiB
/// of headroom. Pure.
pub fn room_check(
    mode: MigrationMode,
    rss: u64,
    available: u64,
    node: &str,
) -> Result<(), AgentError> {
    let copies = if mode == MigrationMode::PostCopy {
        1
    } else {
        2
    };
    let need = rss.saturating_mul(copies) + (256 << 20);
    if available < need {
        return Err(AgentError::NoRoom(format!(
            "{node} has {} MiB of memory available, a {mode} migration of {} MiB needs {} MiB",
            available >> 20,
            rss >> 20,
            need >> 20
        )));
    }
    Ok(())
}

/// Resident size from which `auto` prefers post-copy (stop-and-copy downtime grows with it).
pub const AUTO_POSTCOPY_MIN_RSS: u64 = 256 << 20;

/// When the pre-copy loop stops and the final (frozen) dump runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecopyPolicy {
    /// Rounds before giving up on convergence (round 0 copies everything).
    pub max_rounds: u32,
    /// Stop once a round wrote at most this fraction of the pages it scanned.
    pub dirty_fraction: f64,
}

impl Default for PrecopyPolicy {
    fn default() -> Self {
        PrecopyPolicy {
            max_rounds: 5,
            dirty_fraction: 0.05,
        }
    }
}

/// Convergence rule of the pre-copy loop. Pure: `None` = run another round, `Some(why)` = stop.
/// Rules, in order: the round limit; a dirty round (k >= 1) whose share of round 0's pages is
/// under the threshold; a dirty round that wrote no fewer pages than the one before it (the
/// working set is not shrinking, more rounds only add traffic).
pub fn precopy_converged(
    policy: &PrecopyPolicy,
    rounds: &[rebalancer_proto::RoundStats],
) -> Option<String> {
    let last = rounds.last()?;
    if rounds.len() as u32 >= policy.max_rounds {
        return Some(format!("reached the limit of {} rounds", policy.max_rounds));
    }
    if rounds.len() < 2 {
        return None;
    }
    // Relative to what round 0 wrote (the resident memory): the scanned count also covers
    // mapped pages that were never touched, which would loosen the threshold.
    let resident = rounds[0].pages_written.max(1);
    let frac = last.pages_written as f64 / resident as f64;
    if frac <= policy.dirty_fraction {
        return Some(format!(
            "round {} wrote {:.1}% of the resident pages (<= {:.1}%)",
            last.round,
            frac * 100.0,
            policy.dirty_fraction * 100.0
        ));
    }
    let prev = &rounds[rounds.len() - 2];
    if rounds.len() >= 3 && last.pages_written >= prev.pages_written {
        return Some(format!(
            "round {} wrote {} pages, no fewer than round {} ({}): not converging",
            last.round, last.pages_written, prev.round, prev.pages_written
        ));
    }
    None
}

/// Phase bookkeeping on a record.
/// The modes this node offers for a migration: pre-copy only with pages in clear (CRIU's TLS
/// page server failed between pre-copy rounds where measured, docs/precopy.md). Pure.
pub fn modes_with_encryption(modes: &[MigrationMode], encrypt: bool) -> Vec<MigrationMode> {
    modes
        .iter()
        .copied()
        .filter(|m| !(encrypt && *m == MigrationMode::PreCopy))
        .collect()
}

/// The downtime model `auto` decides with: the default one until this node has measured
/// moves, then one fitted to them ([`measured_model`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModeModel {
    pub model: DowntimeModel,
    /// How many of this node's measured moves it was fitted to (0: the default model).
    pub moves: usize,
}

impl ModeModel {
    fn basis(&self) -> String {
        match self.moves {
            0 => "default model: no move from this node measured yet".into(),
            1 => "from this node's last measured move".into(),
            n => format!("from this node's last {n} measured moves"),
        }
    }
}

/// Moves [`measured_model`] looks at, newest first.
pub const MODEL_MOVES: usize = 20;
/// Below this resident size a stop-and-copy move measures the fixed cost, not the bandwidth.
const MODEL_SMALL_RSS: u64 = 32 << 20;

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// A downtime model fitted to the succeeded moves from this node (the newest [`MODEL_MOVES`]):
/// the fixed cost is the median post-copy downtime (which copies no memory while frozen), else
/// the median stop-and-copy downtime of small containers; the bandwidth is the median of
/// RSS / (downtime - fixed) over the larger stop-and-copy moves. What it cannot fit keeps the
/// default. Pure.
pub fn measured_model<'a>(
    node: &str,
    records: impl IntoIterator<Item = &'a rebalancer_proto::MigrationRecord>,
) -> ModeModel {
    let mut moves: Vec<(u64, MigrationMode, u64, u64)> = records
        .into_iter()
        .filter(|r| r.source == node && r.state == rebalancer_proto::MigrationState::Succeeded)
        .filter_map(|r| {
            Some((
                r.started_at,
                r.mode?,
                r.stats.rss_bytes,
                r.stats.downtime_ms?,
            ))
        })
        .filter(|(_, m, _, _)| matches!(m, MigrationMode::StopAndCopy | MigrationMode::PostCopy))
        .collect();
    moves.sort_by_key(|m| std::cmp::Reverse(m.0));
    moves.truncate(MODEL_MOVES);
    let mut model = DowntimeModel::default();
    let post: Vec<f64> = moves
        .iter()
        .filter(|m| m.1 == MigrationMode::PostCopy)
        .map(|m| m.3 as f64)
        .collect();
    let small: Vec<f64> = moves
        .iter()
        .filter(|m| m.1 == MigrationMode::StopAndCopy && m.2 < MODEL_SMALL_RSS)
        .map(|m| m.3 as f64)
        .collect();
    if let Some(f) = median(post).or_else(|| median(small)) {
        model.fixed_ms = f.round() as u64;
    }
    let rates: Vec<f64> = moves
        .iter()
        .filter(|m| m.1 == MigrationMode::StopAndCopy && m.2 >= MODEL_SMALL_RSS)
        .map(|m| {
            let copy_s = (m.3.saturating_sub(model.fixed_ms)).max(10) as f64 / 1000.0;
            (m.2 as f64 / f64::from(1 << 20)) / copy_s
        })
        .collect();
    if let Some(r) = median(rates) {
        model.bandwidth_mib_s = r;
    }
    ModeModel {
        model,
        moves: moves.len(),
    }
}

/// The modes this node offers ([`modes_with_encryption`]), or the refusal of a pre-copy that
/// only the encryption rules out. Pure.
pub fn offered_modes(
    requested: MigrationMode,
    kernel: &[MigrationMode],
    encrypt: bool,
) -> Result<Vec<MigrationMode>, AgentError> {
    let local = modes_with_encryption(kernel, encrypt);
    // Only when the kernel could: otherwise choose_mode names what the kernel lacks.
    if requested == MigrationMode::PreCopy
        && kernel.contains(&MigrationMode::PreCopy)
        && !local.contains(&MigrationMode::PreCopy)
    {
        return Err(AgentError::Unsupported(
            "pre-copy with encrypted pages is not supported yet (CRIU's TLS page server \
             fails between pre-copy rounds, docs/precopy.md); use stop-and-copy or \
             post-copy, or encrypt_memory = false on both nodes"
                .into(),
        ));
    }
    Ok(local)
}

/// Picks the concrete mode and says why. Pure.
pub fn choose_mode(
    requested: MigrationMode,
    rss: u64,
    max_downtime_ms: Option<u64>,
    local: &[MigrationMode],
    remote: &[MigrationMode],
    model: &ModeModel,
) -> Result<(MigrationMode, String), AgentError> {
    let both = |m: MigrationMode| local.contains(&m) && remote.contains(&m);
    match requested {
        MigrationMode::Auto => {
            let est_ms = model
                .model
                .downtime_ms(MigrationMode::StopAndCopy, rss.div_ceil(1 << 20));
            let over_budget = max_downtime_ms.is_some_and(|b| est_ms > b);
            let large = rss >= AUTO_POSTCOPY_MIN_RSS;
            // Pre-copy keeps the source copy until the commit (post-copy cannot), so a large
            // container without a tight budget goes pre-copy wherever soft-dirty exists.
            if large && !over_budget && both(MigrationMode::PreCopy) {
                return Ok((
                    MigrationMode::PreCopy,
                    format!(
                        "auto: pre-copy because RSS {} MiB >= {} MiB and both nodes track dirty pages; \
                         the source keeps its copy until the destination commits",
                        rss >> 20,
                        AUTO_POSTCOPY_MIN_RSS >> 20
                    ),
                ));
            }
            if both(MigrationMode::PostCopy) && (large || over_budget) {
                let precopy_note = if over_budget {
                    String::new()
                } else if !local.contains(&MigrationMode::PreCopy) {
                    "; pre-copy unavailable: the source kernel lacks soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY)".to_string()
                } else {
                    "; pre-copy unavailable: the destination kernel lacks soft-dirty tracking"
                        .to_string()
                };
                Ok((
                    MigrationMode::PostCopy,
                    format!(
                        "auto: post-copy because RSS {} MiB {} and both nodes have userfaultfd{precopy_note}",
                        rss >> 20,
                        if over_budget {
                            format!("gives an estimated stop-and-copy downtime of {est_ms} ms ({}) over the {} ms budget", model.basis(), max_downtime_ms.unwrap_or(0))
                        } else {
                            format!(">= {} MiB", AUTO_POSTCOPY_MIN_RSS >> 20)
                        }
                    ),
                ))
            } else if both(MigrationMode::StopAndCopy) {
                let why = if !both(MigrationMode::PostCopy) {
                    "post-copy unavailable (userfaultfd missing on a node)".to_string()
                } else {
                    format!(
                        "RSS {} MiB is small: estimated downtime {est_ms} ms ({})",
                        rss >> 20,
                        model.basis()
                    )
                };
                Ok((
                    MigrationMode::StopAndCopy,
                    format!("auto: stop-and-copy because {why}"),
                ))
            } else {
                Err(AgentError::Unsupported(
                    "no migration mode is supported by both nodes".into(),
                ))
            }
        }
        m => {
            if !local.contains(&m) {
                let why = if m == MigrationMode::PreCopy {
                    "the kernel lacks soft-dirty page tracking (CONFIG_MEM_SOFT_DIRTY; `criu check --feature mem_dirty_track` says OFF)".to_string()
                } else if m == MigrationMode::PostCopy {
                    "userfaultfd is unavailable or fs.pipe-max-size < 4 MiB".to_string()
                } else {
                    "CRIU is missing or too old".to_string()
                };
                return Err(AgentError::Unsupported(format!(
                    "{m} is not supported on the source: {why}"
                )));
            }
            if !remote.contains(&m) {
                return Err(AgentError::Unsupported(format!(
                    "{m} is not supported on the destination"
                )));
            }
            Ok((m, "requested".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn encryption_withholds_pre_copy_only() {
        use rebalancer_proto::MigrationMode::*;
        let all = [StopAndCopy, PostCopy, PreCopy, Auto];
        assert_eq!(
            super::modes_with_encryption(&all, true),
            [StopAndCopy, PostCopy, Auto]
        );
        assert_eq!(super::modes_with_encryption(&all, false), all);
    }

    #[test]
    fn migration_ids_from_peers_never_name_a_path() {
        use super::check_migration_id as c;
        assert!(c("0828ef3d-1234-4abc-9def-0123456789ab").is_ok());
        for bad in ["", "../etc", "a/b", "..", "x y", &"a".repeat(65), "m\0"] {
            let e = c(bad).expect_err(bad);
            assert!(e.to_string().contains("letters, digits and dashes"), "{e}");
        }
    }

    use super::*;
    use MigrationMode::*;

    #[test]
    fn auto_prefers_postcopy_for_large_rss() {
        let all = [StopAndCopy, PostCopy, Auto];
        let (m, why) =
            choose_mode(Auto, 1 << 30, None, &all, &all, &ModeModel::default()).expect("ok");
        assert_eq!(m, PostCopy);
        assert!(why.contains("1024 MiB"), "{why}");
        let (m, why) =
            choose_mode(Auto, 16 << 20, None, &all, &all, &ModeModel::default()).expect("ok");
        assert_eq!(m, StopAndCopy);
        assert!(why.contains("small"), "{why}");
        // A tight budget tips even a small container to post-copy.
        let (m, _) =
            choose_mode(Auto, 128 << 20, Some(50), &all, &all, &ModeModel::default()).expect("ok");
        assert_eq!(m, PostCopy);
        let (m, why) = choose_mode(
            Auto,
            1 << 30,
            None,
            &all,
            &[StopAndCopy, Auto],
            &ModeModel::default(),
        )
        .expect("ok");
        assert_eq!(m, StopAndCopy);
        assert!(why.contains("userfaultfd"), "{why}");
    }

    fn moved(
        mode: MigrationMode,
        rss_mib: u64,
        downtime_ms: u64,
        at: u64,
    ) -> rebalancer_proto::MigrationRecord {
        rebalancer_proto::MigrationRecord {
            id: format!("m{at}"),
            container: "c".into(),
            task: None,
            source: "node1".into(),
            destination: "node2".into(),
            requested_mode: Auto,
            mode: Some(mode),
            mode_reason: None,
            state: rebalancer_proto::MigrationState::Succeeded,
            phases: Vec::new(),
            stats: rebalancer_proto::MigrationStats {
                rss_bytes: rss_mib << 20,
                downtime_ms: Some(downtime_ms),
                ..Default::default()
            },
            error: None,
            started_at: at,
            ended_at: Some(at + 1),
            cancelled_by: None,
        }
    }

    #[test]
    fn auto_estimates_from_this_nodes_measured_moves() {
        // Post-copy gives the fixed cost (250 ms), the 68 MiB stop-and-copy moves the rate:
        // 68 MiB in 650 - 250 ms = 170 MiB/s.
        let mut recs = vec![
            moved(PostCopy, 512, 240, 1),
            moved(PostCopy, 256, 250, 2),
            moved(PostCopy, 1024, 260, 3),
            moved(StopAndCopy, 68, 650, 4),
            moved(StopAndCopy, 68, 640, 5),
            moved(StopAndCopy, 68, 660, 6),
        ];
        let mut failed = moved(StopAndCopy, 68, 5, 7);
        failed.state = rebalancer_proto::MigrationState::RolledBack;
        let mut other = moved(StopAndCopy, 68, 5, 8);
        other.source = "node3".into();
        recs.extend([failed, other]);
        let m = measured_model("node1", &recs);
        assert_eq!(m.moves, 6);
        assert_eq!(m.model.fixed_ms, 250);
        assert!((m.model.bandwidth_mib_s - 170.0).abs() < 1.0, "{m:?}");
        let est = m.model.downtime_ms(StopAndCopy, 68);
        assert!((645..=655).contains(&est), "{est}");
        let all = [StopAndCopy, PostCopy, Auto];
        let (mode, why) = choose_mode(Auto, 68 << 20, None, &all, &all, &m).expect("ok");
        assert_eq!(mode, StopAndCopy);
        assert!(
            why.contains(&format!(
                "estimated downtime {est} ms (from this node's last 6 measured moves)"
            )),
            "{why}"
        );
        // A budget under what this node measured tips the same container to post-copy.
        let (mode, why) = choose_mode(Auto, 68 << 20, Some(400), &all, &all, &m).expect("ok");
        assert_eq!(mode, PostCopy, "{why}");
        // Only the newest moves count; nothing measured leaves the default.
        let many: Vec<_> = (0..30)
            .map(|k| moved(PostCopy, 64, 100 + k, 100 + k))
            .collect();
        assert_eq!(measured_model("node1", &many).moves, MODEL_MOVES);
        assert_eq!(measured_model("node1", &many).model.fixed_ms, 120);
        assert_eq!(measured_model("node9", &recs), ModeModel::default());
    }

    #[test]
    fn auto_estimates_downtime_as_the_planner_does() {
        let all = [StopAndCopy, PostCopy, Auto];
        let (_, why) =
            choose_mode(Auto, 3 << 20, None, &all, &all, &ModeModel::default()).expect("ok");
        let planner = DowntimeModel::default().downtime_ms(StopAndCopy, 3);
        assert!(
            why.contains(&format!("estimated downtime {planner} ms")),
            "{why}"
        );
        // The fixed cost alone is more than the bare copy time of a small container.
        assert!(planner >= DowntimeModel::default().fixed_ms, "{planner}");
    }

    #[test]
    fn auto_prefers_precopy_where_both_nodes_track_dirty_pages() {
        let all = [StopAndCopy, PostCopy, PreCopy, Auto];
        let (m, why) =
            choose_mode(Auto, 1 << 30, None, &all, &all, &ModeModel::default()).expect("ok");
        assert_eq!(m, PreCopy, "{why}");
        // A tight budget wants the shortest freeze: post-copy.
        let (m, _) =
            choose_mode(Auto, 1 << 30, Some(50), &all, &all, &ModeModel::default()).expect("ok");
        assert_eq!(m, PostCopy);
        // Destination without soft-dirty: post-copy, and the reason says why not pre-copy.
        let no_sd = [StopAndCopy, PostCopy, Auto];
        let (m, why) =
            choose_mode(Auto, 1 << 30, None, &all, &no_sd, &ModeModel::default()).expect("ok");
        assert_eq!(m, PostCopy);
        assert!(why.contains("destination kernel lacks soft-dirty"), "{why}");
        let (m, why) =
            choose_mode(Auto, 1 << 30, None, &no_sd, &no_sd, &ModeModel::default()).expect("ok");
        assert_eq!(m, PostCopy);
        assert!(why.contains("CONFIG_MEM_SOFT_DIRTY"), "{why}");
    }

    #[test]
    fn precopy_without_soft_dirty_names_the_kernel_feature() {
        let e = choose_mode(
            PreCopy,
            0,
            None,
            &[StopAndCopy],
            &[StopAndCopy, PreCopy],
            &ModeModel::default(),
        )
        .expect_err("unsupported");
        assert!(e.to_string().contains("CONFIG_MEM_SOFT_DIRTY"), "{e}");
        let e = choose_mode(
            PostCopy,
            0,
            None,
            &[PostCopy],
            &[StopAndCopy],
            &ModeModel::default(),
        )
        .expect_err("remote");
        assert!(e.to_string().contains("destination"), "{e}");
    }

    fn round(round: u32, scanned: u64, written: u64) -> rebalancer_proto::RoundStats {
        rebalancer_proto::RoundStats {
            round,
            pages_scanned: scanned,
            pages_written: written,
            pages_skipped_parent: scanned - written,
            duration_ms: 10,
        }
    }

    #[test]
    fn dirty_fraction_is_relative_to_resident_pages_not_scanned() {
        let p = PrecopyPolicy::default();
        // 2000 mapped pages, 1000 resident: 80 dirty is 8% of resident, not 4% of scanned.
        assert_eq!(
            precopy_converged(&p, &[round(0, 2000, 1000), round(1, 2000, 80)]),
            None
        );
        let why =
            precopy_converged(&p, &[round(0, 2000, 1000), round(1, 2000, 40)]).expect("converged");
        assert!(why.contains("4.0% of the resident"), "{why}");
    }

    #[test]
    fn precopy_convergence_rule() {
        let p = PrecopyPolicy::default();
        assert_eq!(precopy_converged(&p, &[]), None);
        // Round 0 copies everything: never enough on its own.
        assert_eq!(precopy_converged(&p, &[round(0, 1000, 1000)]), None);
        // Few dirty pages in round 1: converged.
        let why =
            precopy_converged(&p, &[round(0, 1000, 1000), round(1, 1000, 40)]).expect("converged");
        assert!(why.contains("4.0%"), "{why}");
        // Shrinking but still dirty: go on.
        assert_eq!(
            precopy_converged(
                &p,
                &[
                    round(0, 1000, 1000),
                    round(1, 1000, 300),
                    round(2, 1000, 200)
                ]
            ),
            None
        );
        // Not shrinking: stop.
        let why = precopy_converged(
            &p,
            &[
                round(0, 1000, 1000),
                round(1, 1000, 300),
                round(2, 1000, 310),
            ],
        )
        .expect("stop");
        assert!(why.contains("not converging"), "{why}");
        // Round limit.
        let rounds: Vec<_> = (0..5)
            .map(|r| round(r, 1000, 900 - u64::from(r) * 100))
            .collect();
        assert!(precopy_converged(&p, &rounds)
            .expect("limit")
            .contains("limit of 5"));
    }

    #[test]
    fn room_check_counts_image_copies() {
        let gib = 1u64 << 30;
        assert!(room_check(MigrationMode::PostCopy, gib, 2 * gib, "n").is_ok());
        assert!(room_check(MigrationMode::StopAndCopy, gib, 2 * gib, "n").is_err());
        let e = room_check(MigrationMode::StopAndCopy, gib, gib, "n2").expect_err("no room");
        assert!(matches!(e, AgentError::NoRoom(_)));
        assert!(e.to_string().contains("n2 has 1024 MiB"), "{e}");
    }
}
