//! `rebalctl cancel` on the simulated nodes: a cancel at each phase before the commit point
//! ends in the rollback LIFECYCLE.md describes, one at the commit point is too late; and where a
//! moved Slurm task runs (`runs_in`).

use std::time::Duration;

use rebalancer_proto::{ContainerState, MigrationMode, MigrationRecord, MigrationState};

use super::super::sim::Fault;
use super::{assert_rolled_back, migrate, migrate_then, pair, pair_of, Node, ID, MODES};

/// Where an operator's cancel can strike before the commit point: (mode, what holds the source
/// there, the source's log line that says it got there).
fn cancel_points() -> Vec<(MigrationMode, Fault, &'static str)> {
    use MigrationMode::*;
    vec![
        (StopAndCopy, Fault::Hang("dump"), "dump (hangs)"),
        (
            StopAndCopy,
            Fault::LinkStall("images"),
            "images: answer stalled",
        ),
        (
            StopAndCopy,
            Fault::LinkStall("restore"),
            "restore: answer stalled",
        ),
        (
            PostCopy,
            Fault::LinkStall("images"),
            "images: answer stalled",
        ),
        (
            PostCopy,
            Fault::LinkStall("restore"),
            "restore: answer stalled",
        ),
        (
            PreCopy,
            Fault::LinkStall("precopy-round"),
            "precopy-round: answer stalled",
        ),
        (PreCopy, Fault::Hang("pre-dump"), "pre-dump (hangs)"),
        (PreCopy, Fault::Hang("dump"), "dump (hangs)"),
    ]
}

/// Runs c1's migration with `fault` armed on the source and cancels it (as `uid 1000`) once the
/// source's log shows `marker`; the migration's end and the cancel's answer.
async fn migrate_and_cancel(
    a: &Node,
    b: &Node,
    mode: MigrationMode,
    fault: Fault,
    marker: &str,
) -> (
    MigrationRecord,
    Option<Result<(), crate::migration::cancel::CancelRefused>>,
) {
    a.host.inject(fault);
    let answer = std::cell::RefCell::new(None);
    let rec = migrate_then(a, b, mode, |_| {
        let there = a.host.state().log.iter().any(|l| l == marker);
        if there && answer.borrow().is_none() {
            let ids = a.agent.cancels.ids();
            let [id] = ids.as_slice() else {
                panic!("running at {marker}: {ids:?}");
            };
            *answer.borrow_mut() = Some(a.agent.cancels.cancel(id, "uid 1000"));
        } else if answer.borrow().is_some() && a.host.waiting_for_a_timer() {
            a.host.advance(Duration::from_secs(1));
        }
    })
    .await
    .expect("preflight");
    (rec, answer.into_inner())
}

/// A cancel before the commit point rolls back as any failure there does: the source resumes,
/// the destination is clean, and the record says who cancelled.
#[tokio::test]
async fn a_cancel_in_any_phase_before_commit_rolls_back_and_names_who_cancelled() {
    for (mode, fault, marker) in cancel_points() {
        let (a, b) = pair("cancel");
        let what = format!("{mode}, cancelled at {marker:?}");
        let (rec, answer) = migrate_and_cancel(&a, &b, mode, fault, marker).await;
        assert_eq!(answer, Some(Ok(())), "{what}: {:?}", a.host.state().log);
        assert_eq!(
            rec.state,
            MigrationState::RolledBack,
            "{what}: {:?}",
            rec.error
        );
        assert_eq!(rec.cancelled_by.as_deref(), Some("uid 1000"), "{what}");
        assert!(
            rec.error
                .as_deref()
                .is_some_and(|e| e.contains("cancelled by uid 1000")),
            "{what}: {:?}",
            rec.error
        );
        assert!(
            rec.phases
                .iter()
                .all(|p| p.phase != rebalancer_proto::Phase::NetworkSwitch),
            "{what}: reached the commit point: {:?}",
            rec.phases
        );
        assert_rolled_back(&a, &b, &what);
        // Ended: nothing left to cancel.
        assert!(!a.agent.cancels.contains(&rec.id), "{what}");
    }
}

/// A Slurm task that moved runs in the destination's restore step: its container says so
/// (`runs_in`), keeps the step the user started as `task`, and a restarted agent still knows.
#[tokio::test]
async fn a_moved_task_names_the_restore_step_it_runs_in() {
    let (a, b) = pair_of("runs-in", true);
    let before = a.agent.info(a.agent.containers().get(ID).expect("c1"));
    assert_eq!(before.runs_in, None);
    let rec = migrate(&a, &b, MigrationMode::StopAndCopy)
        .await
        .expect("preflight");
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    let after = b.agent.info(b.agent.containers().get(ID).expect("c1 on b"));
    assert_eq!(after.task, before.task);
    let step = rebalancer_proto::TaskRef {
        job_id: 7,
        step_id: 8,
        task_id: 0,
    };
    assert_eq!(after.runs_in, Some(step.clone()));
    let rec =
        crate::store::ContainerRecord::of(b.agent.containers().get(ID).expect("c1 on b"), &|_| {
            Some(1)
        })
        .expect("a live record");
    let back: crate::store::ContainerRecord =
        serde_json::from_str(&serde_json::to_string(&rec).expect("json")).expect("record");
    assert_eq!(back.container(ContainerState::Running).runs_in, Some(step));
}

/// At the commit point a cancel is refused as too late, and the migration ends as the
/// destination's answer says (here: committed), untouched by the cancel.
#[tokio::test]
async fn a_cancel_at_the_commit_point_is_too_late_and_changes_nothing() {
    for mode in MODES {
        let (a, b) = pair("cancel-late");
        let (rec, answer) = migrate_and_cancel(
            &a,
            &b,
            mode,
            Fault::LinkStall("commit"),
            "commit: answer stalled",
        )
        .await;
        let e = answer.expect("cancel asked").expect_err("refused");
        assert_eq!(
            e.to_string(),
            format!("too late: migration {} is committing", rec.id),
            "{mode}"
        );
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        assert_eq!(rec.cancelled_by, None, "{mode}");
        assert_eq!(a.host.live(), [], "{mode}: source copy still alive");
        assert_eq!(b.host.live().len(), 1, "{mode}");
    }
}
