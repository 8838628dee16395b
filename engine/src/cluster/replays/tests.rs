use std::collections::BTreeMap;

use super::*;
use crate::cluster::{PartitionClaim, ProjectionClaims, ReplayClaims};

fn claim(partition: i32, state: ClaimState, next: i64, lag: i64) -> PartitionClaim {
    PartitionClaim {
        topic: "orders".into(),
        partition,
        state,
        next_offset: next,
        restore_until: None,
        lag_events: Some(lag),
    }
}

/// A worker whose live generation is `live`, folding `replayed` of
/// generation 2 (seen at `seen`, its live loop stopped or not).
fn worker(
    id: &str,
    live: u64,
    replayed: Vec<PartitionClaim>,
    seen: ReplayState,
    stopped: bool,
) -> WorkerRecord {
    WorkerRecord {
        worker_id: id.into(),
        url: format!("http://{id}"),
        published_at_ms: 0,
        projections: BTreeMap::from([(
            "p".to_owned(),
            ProjectionClaims {
                generation: live,
                status: "running".into(),
                partitions: Vec::new(),
                replay: (live < 2).then(|| ReplayClaims {
                    generation: 2,
                    seen,
                    live_stopped: stopped,
                    events_per_second: 100.0,
                    status: "running".into(),
                    partitions: replayed,
                }),
            },
        )]),
    }
}

fn record(state: ReplayState) -> ReplayRecord {
    ReplayRecord {
        projection: "p".into(),
        generation: 2,
        state,
        requested_on: "w1".into(),
        started_at_ms: 0,
        updated_at_ms: 0,
        targets: BTreeMap::from([("orders/0".to_owned(), 50), ("orders/1".to_owned(), 70)]),
    }
}

fn partitions() -> Vec<String> {
    vec!["orders/0".into(), "orders/1".into()]
}

use ClaimState::{Live, Restoring};
use ReplayState::{HandingOver, Running, Switched, Switching};

#[test]
fn the_handover_starts_once_every_partition_is_restored_somewhere_within_the_switch_distance() {
    let running = record(Running);
    let one = |lag0, state1| {
        vec![
            worker("w1", 1, vec![claim(0, Live, 40, lag0)], Running, false),
            worker("w2", 1, vec![claim(1, state1, 60, 5)], Running, false),
        ]
    };
    assert_eq!(
        advance(&running, &one(5, Live), &partitions(), 10),
        Step::Write(HandingOver)
    );
    assert_eq!(
        advance(&running, &one(6, Live), &partitions(), 10),
        Step::Wait,
        "lag 11 > 10"
    );
    assert_eq!(
        advance(&running, &one(0, Restoring), &partitions(), 10),
        Step::Wait,
        "orders/1 restoring"
    );
    let missing = vec![worker("w1", 1, vec![claim(0, Live, 40, 0)], Running, false)];
    assert_eq!(
        advance(&running, &missing, &partitions(), 10),
        Step::Wait,
        "nobody folds orders/1"
    );
    assert_eq!(
        advance(&running, &one(0, Live), &[], 10),
        Step::Wait,
        "partition count unknown"
    );
}

#[test]
fn the_targets_are_measured_only_once_every_worker_stopped_the_old_generation() {
    let handing_over = record(HandingOver);
    let workers = |seen, stopped| {
        vec![
            worker("w1", 1, vec![claim(0, Live, 40, 0)], HandingOver, true),
            worker("w2", 1, vec![claim(1, Live, 60, 0)], seen, stopped),
        ]
    };
    assert_eq!(
        advance(&handing_over, &workers(HandingOver, true), &partitions(), 10),
        Step::MeasureTargets
    );
    assert_eq!(
        advance(&handing_over, &workers(HandingOver, false), &partitions(), 10),
        Step::Wait
    );
    assert_eq!(
        advance(&handing_over, &workers(Running, true), &partitions(), 10),
        Step::Wait,
        "w2 has not seen the handover: it may still serve the old generation"
    );
    // A worker already on generation 2 (it switched, or adopted it) is done.
    let mut switched = workers(HandingOver, false);
    switched[1] = worker("w2", 2, Vec::new(), HandingOver, false);
    assert_eq!(
        advance(&handing_over, &switched, &partitions(), 10),
        Step::MeasureTargets
    );
}

#[test]
fn the_switch_waits_for_every_partition_at_its_target() {
    let switching = record(Switching);
    let workers = |next1, state1| {
        vec![
            worker("w1", 1, vec![claim(0, Live, 50, 0)], Switching, true),
            worker("w2", 1, vec![claim(1, state1, next1, 0)], Switching, true),
        ]
    };
    assert_eq!(
        advance(&switching, &workers(70, Live), &partitions(), 10),
        Step::Write(Switched)
    );
    assert_eq!(
        advance(&switching, &workers(69, Live), &partitions(), 10),
        Step::Wait
    );
    assert_eq!(
        advance(&switching, &workers(80, Restoring), &partitions(), 10),
        Step::Wait
    );
    assert_eq!(
        advance(&record(Switched), &workers(80, Live), &partitions(), 10),
        Step::Wait
    );
}

#[test]
fn the_status_sums_the_best_claim_of_every_partition() {
    let workers = vec![
        worker(
            "w1",
            1,
            vec![claim(0, Live, 40, 10), claim(1, Restoring, 5, 65)],
            Running,
            false,
        ),
        worker("w2", 1, vec![claim(1, Live, 60, 10)], Running, false),
    ];
    let status = status(&record(Running), &workers, &partitions());
    assert_eq!(status["generation"], 2);
    assert_eq!(status["phase"], "replaying");
    assert_eq!(status["progress"]["applied"], 100);
    assert_eq!(status["progress"]["lag_events"], 20);
    assert_eq!(status["progress"]["target"], 120);
    assert_eq!(status["progress"]["events_per_second"], 200.0);
    assert_eq!(status["progress"]["eta_seconds"], 0.1);
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
}
