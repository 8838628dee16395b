//! Replays across workers: one record per projection in the cluster topic
//! ([`ReplayRecord`]) that every worker acts on for the partitions it owns.
//!
//! ```text
//!  running ──every partition of G restored on some worker, total lag ≤ switch_lag_events──▶
//!  handing_over ──every live worker has stopped folding the old generation──▶
//!  switching{targets: high watermarks measured then} ──every partition of G at its target──▶
//!  switched                (aborted from running, handing_over or switching)
//! ```
//!
//! A request on any worker writes `running` with the next generation number;
//! each worker then folds its share of that generation in the generation's own
//! consumer group (Kafka spreads the partitions). The coordinator, the live
//! worker with the lowest id, moves the record on when the workers' published
//! claims say so ([`advance`]); every worker follows the record ([`follow`]).
//!
//! Why reads never see an older value: once a worker has seen `handing_over`
//! it serves the old generation no more and stops its loop; the targets are
//! high watermarks measured after every live worker said its loop had stopped,
//! so they are at or past anything any worker served from the old generation.
//! The new generation is served only from `switched` on, past those targets,
//! and a read that would mix generations across workers is a 503.

use std::sync::Arc;

use serde_json::{json, Value};
use tracing::warn;

use super::{ClaimState, ReplayRecord, ReplayState, WorkerRecord};
use crate::store::Store;
use crate::supervisor::Supervisor;

/// What the coordinator does next with a replay.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Nothing yet.
    Wait,
    /// Write the record in this state.
    Write(ReplayState),
    /// Measure the high watermarks and write `switching` with them.
    MeasureTargets,
}

/// The coordinator's next step for `record`, from the live workers' records:
/// `partitions` lists every partition (`topic/partition`) of the projection's
/// topics (empty when the brokers have not said how many there are).
pub fn advance(
    record: &ReplayRecord,
    workers: &[WorkerRecord],
    partitions: &[String],
    switch_lag_events: i64,
) -> Step {
    let name = &record.projection;
    let g = record.generation;
    if partitions.is_empty() {
        return Step::Wait;
    }
    match record.state {
        ReplayState::Running => {
            let mut lag = 0i64;
            for partition in partitions {
                let best = claims_of(workers, name, g, partition)
                    .filter(|(state, _, _)| *state == ClaimState::Live)
                    .filter_map(|(_, _, lag)| lag)
                    .min();
                match best {
                    Some(behind) => lag = lag.saturating_add(behind),
                    None => return Step::Wait,
                }
            }
            if lag <= switch_lag_events {
                Step::Write(ReplayState::HandingOver)
            } else {
                Step::Wait
            }
        }
        ReplayState::HandingOver => {
            let all_stopped = workers.iter().all(|worker| {
                let Some(claims) = worker.projections.get(name) else {
                    return true;
                };
                claims.generation >= g
                    || claims.replay.as_ref().is_some_and(|r| {
                        r.generation == g && r.seen >= ReplayState::HandingOver && r.live_stopped
                    })
            });
            if all_stopped {
                Step::MeasureTargets
            } else {
                Step::Wait
            }
        }
        ReplayState::Switching => {
            let all_there = partitions.iter().all(|partition| {
                let target = record.targets.get(partition).copied().unwrap_or(0);
                claims_of(workers, name, g, partition)
                    .any(|(state, next, _)| state == ClaimState::Live && next >= target)
            });
            if all_there {
                Step::Write(ReplayState::Switched)
            } else {
                Step::Wait
            }
        }
        ReplayState::Switched | ReplayState::Aborted => Step::Wait,
    }
}

/// Every worker's claim of `partition` in generation `g` of `projection`
/// (folded as the replay, or as the live generation once switched there):
/// (state, next offset, lag).
fn claims_of<'a>(
    workers: &'a [WorkerRecord],
    projection: &'a str,
    g: u64,
    partition: &'a str,
) -> impl Iterator<Item = (ClaimState, i64, Option<i64>)> + 'a {
    workers
        .iter()
        .filter_map(move |worker| worker.projections.get(projection))
        .flat_map(move |claims| {
            let replayed = claims
                .replay
                .as_ref()
                .filter(|r| r.generation == g)
                .map(|r| r.partitions.as_slice())
                .unwrap_or_default();
            let live = if claims.generation == g {
                claims.partitions.as_slice()
            } else {
                &[]
            };
            replayed.iter().chain(live)
        })
        .filter(move |claim| format!("{}/{}", claim.topic, claim.partition) == partition)
        .map(|claim| (claim.state, claim.next_offset, claim.lag_events))
}

/// Carries out on this worker what `record` says: start folding its share of
/// the replay's generation, stop the old generation, switch, or drop an
/// aborted replay.
pub fn follow(supervisor: &Supervisor, record: &ReplayRecord, store: &Arc<Store>) {
    let g = record.generation;
    if supervisor.live().generation.number >= g {
        return;
    }
    let local = supervisor.replay();
    if record.state == ReplayState::Aborted {
        if local.is_some_and(|r| r.fold.generation.number == g && !r.aborting()) {
            supervisor.abort_replay(store);
        }
        return;
    }
    match local {
        Some(replay) if replay.fold.generation.number != g => {
            // A replay of this worker's own that the deployment does not run.
            if !replay.aborting() {
                supervisor.abort_replay(store);
            }
            return;
        }
        Some(_) => {}
        None => {
            if let Err(e) = supervisor.start_replay_at(store, g) {
                warn!(projection = %supervisor.name, generation = g, error = %e,
                    "starting this worker's share of the replay");
                return;
            }
        }
    }
    if record.state >= ReplayState::HandingOver {
        supervisor.cluster_handover(g);
    }
    if record.state == ReplayState::Switched {
        if let Err(e) = supervisor.cluster_switch(store, g) {
            warn!(projection = %supervisor.name, generation = g, error = %e, "switching to the replayed generation");
        }
    }
}

/// The replay's status over every worker, as the API shows it: the record's
/// step, and progress summed over the best claim of each partition.
pub fn status(record: &ReplayRecord, workers: &[WorkerRecord], partitions: &[String]) -> Value {
    let name = &record.projection;
    let g = record.generation;
    let (mut applied, mut lag, mut unclaimed) = (0i64, 0i64, Vec::new());
    for partition in partitions {
        match claims_of(workers, name, g, partition).max_by_key(|(_, next, _)| *next) {
            Some((_, next, behind)) => {
                applied = applied.saturating_add(next);
                lag = lag.saturating_add(behind.unwrap_or(0));
            }
            None => unclaimed.push(partition.clone()),
        }
    }
    let rate: f64 = workers
        .iter()
        .filter_map(|w| w.projections.get(name)?.replay.as_ref())
        .filter(|r| r.generation == g)
        .map(|r| r.events_per_second)
        .sum();
    let target = applied.saturating_add(lag);
    let eta = if lag == 0 && unclaimed.is_empty() {
        Some(0.0)
    } else if rate > 0.0 {
        Some(lag as f64 / rate)
    } else {
        None
    };
    let folding: Vec<Value> = workers
        .iter()
        .filter_map(|w| {
            let replay = w.projections.get(name)?.replay.as_ref()?;
            (replay.generation == g).then(|| {
                json!({"worker_id": w.worker_id, "status": replay.status,
                "partitions": replay.partitions.len(), "live_stopped": replay.live_stopped})
            })
        })
        .collect();
    json!({
        "generation": g,
        "phase": record.state.as_str(),
        "across_workers": true,
        "requested_on": record.requested_on,
        "started_at": record.started_at_ms / 1000,
        // The first worker whose share does not fold (poisoned, failed), so a
        // client sees the replay is stuck.
        "fold": {"state": folding.iter().map(|w| w["status"].clone()).find(|s| s != "running")
            .unwrap_or_else(|| json!("running"))},
        "workers": folding,
        "unclaimed_partitions": unclaimed,
        "targets": record.targets,
        "progress": {
            "applied": applied,
            "target": target,
            "ratio": if target == 0 { 1.0 } else { applied as f64 / target as f64 },
            "events_per_second": rate,
            "eta_seconds": eta,
            "lag_events": lag,
        },
    })
}

#[cfg(test)]
mod tests;
