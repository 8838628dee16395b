//! Whether this worker serves a partition of a projection in multi-worker
//! mode, and why not: the one check every local answer (key reads, scans,
//! forwarded reads) makes first.

use crate::cluster::{Cluster, ReplayState};
use crate::fold_state::{Fold, Restore};
use crate::store::SourcePartition;

/// Why this worker does not serve `partition` of `fold`, or `None` when it does.
pub(super) fn not_served(cluster: &Cluster, fold: &Fold, partition: &SourcePartition) -> Option<String> {
    let worker = &cluster.worker_id;
    if !cluster.view_current() {
        return Some(format!(
            "{partition}: worker {worker} has not read the cluster topic `{}` since it started",
            cluster.topic
        ));
    }
    if let Some(replay) = cluster.replay_of(fold.name()) {
        // From the handover on, the old generation may be behind the switch
        // targets, and the new one is served only from the switch on.
        let replacing = matches!(
            replay.state,
            ReplayState::HandingOver | ReplayState::Switching | ReplayState::Switched
        );
        if replacing && replay.generation > fold.generation.number {
            return Some(format!(
                "{partition}: generation {} is being replaced by {} ({}) on worker {worker}",
                fold.generation.number,
                replay.generation,
                replay.state.as_str()
            ));
        }
    }
    if !fold.serves() {
        let state = serde_json::to_value(fold.state()).unwrap_or_default();
        return Some(format!(
            "{partition}: the projection is {} on worker {worker}",
            state["state"]
        ));
    }
    // Without the brokers this worker cannot know whether the group has moved
    // the partition to another worker already.
    if let Some(silent) = crate::lag::brokers_silent_for() {
        return Some(format!(
            "{partition}: worker {worker} has not heard from the brokers for {:.0} s",
            silent.as_secs_f64()
        ));
    }
    match fold.restore_of(partition) {
        Some(Restore::Done) => None,
        Some(Restore::Until(target)) => Some(format!(
            "{partition}: restoring on worker {worker} (up to offset {target})"
        )),
        Some(Restore::Unknown) => Some(format!("{partition}: restoring on worker {worker}")),
        None => Some(format!("{partition}: not assigned to worker {worker}")),
    }
}
