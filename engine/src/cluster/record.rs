//! What a worker publishes about itself in the cluster topic: one record per
//! worker, keyed by its id, replaced on every publication and tombstoned on a
//! clean shutdown.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One worker and what it owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The worker's id (also the record's key).
    pub worker_id: String,
    /// Its HTTP API, as the other workers reach it.
    pub url: String,
    /// When it published this (milliseconds since the epoch, its clock).
    pub published_at_ms: i64,
    /// Per projection, the partitions its live generation owns.
    pub projections: BTreeMap<String, ProjectionClaims>,
}

/// What one worker folds of one projection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionClaims {
    /// The live generation on that worker.
    pub generation: u64,
    /// Its fold loop's state (`running`, `poisoned`, ...).
    pub status: String,
    /// The partitions assigned to it there.
    pub partitions: Vec<PartitionClaim>,
}

/// One partition a worker has assigned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionClaim {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Served (`live`) or still folding up to the high watermark seen when the
    /// worker gained it (`restoring`).
    pub state: ClaimState,
    /// The next offset its stored state reflects.
    pub next_offset: i64,
    /// While restoring: the next offset it must reach (when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_until: Option<i64>,
    /// High watermark − next offset, when the brokers answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_events: Option<i64>,
}

/// Whether a claimed partition is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimState {
    /// Folding up to the high watermark seen at the gain: reads get 503.
    Restoring,
    /// Served.
    Live,
}
