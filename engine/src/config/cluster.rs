//! `[cluster]`: several workers in one consumer group, each answering any read.

use std::path::Path;

use serde::Deserialize;

use super::ConfigError;

/// Keys of the cluster topic's replay records start with this; worker ids may not.
pub const REPLAY_KEY_PREFIX: &str = "replay/";

/// `[cluster]`: multi-worker mode. Without this table a worker runs alone and
/// answers for the partitions it folds.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Unique per worker; its records in the cluster topic are keyed by it.
    /// Default: the host name and the HTTP listen port (`host:port`).
    #[serde(default)]
    pub worker_id: Option<String>,
    /// How the other workers reach this one's HTTP API (`http://10.0.0.5:8080`).
    pub advertised_url: String,
    /// The compacted, single-partition topic where workers publish themselves
    /// and what they own; created at start when missing. Default:
    /// `<kafka.group_prefix>.cluster`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Shared by every worker of the deployment; requests between workers carry
    /// it and are refused without it. Prefer `PROJECTOR__CLUSTER__SECRET` over the
    /// file.
    pub secret: String,
    /// Fold consumers join with `group.instance.id` = the worker id (Kafka's
    /// static membership), so a worker restarting within the session timeout
    /// gets its partitions back without a rebalance.
    #[serde(default)]
    pub static_membership: bool,
    /// Milliseconds between two publications of this worker's record.
    #[serde(default = "default_publish_interval_ms")]
    pub publish_interval_ms: u64,
    /// Milliseconds a forwarded read may take before the asking worker answers
    /// 503 for the partitions it waited for.
    #[serde(default = "default_forward_timeout_ms")]
    pub forward_timeout_ms: u64,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("worker_id", &self.worker_id)
            .field("advertised_url", &self.advertised_url)
            .field("topic", &self.topic)
            .field("secret", &"<redacted>")
            .field("static_membership", &self.static_membership)
            .field("publish_interval_ms", &self.publish_interval_ms)
            .field("forward_timeout_ms", &self.forward_timeout_ms)
            .finish()
    }
}

fn default_publish_interval_ms() -> u64 {
    1_000
}

fn default_forward_timeout_ms() -> u64 {
    5_000
}

impl ClusterConfig {
    /// The worker id: configured, or `<host name>:<listen port>`.
    pub fn worker_id(&self, listen_port: u16) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
            format!("{host}:{listen_port}")
        })
    }

    /// The cluster topic: configured, or `<group_prefix>.cluster`.
    pub fn topic(&self, group_prefix: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("{group_prefix}.cluster"))
    }

    pub(super) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if self.secret.trim().len() < 16 {
            return Err(ConfigError::at(
                file,
                "cluster.secret",
                "must be at least 16 characters (set PROJECTOR__CLUSTER__SECRET)",
            ));
        }
        let url = self.advertised_url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(' ') {
            return Err(ConfigError::at(
                file,
                "cluster.advertised_url",
                format!("`{}` is not an http(s) URL", self.advertised_url),
            ));
        }
        if let Some(id) = &self.worker_id {
            if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
                return Err(ConfigError::at(
                    file,
                    "cluster.worker_id",
                    "must be 1 to 200 printable characters",
                ));
            }
            if id.starts_with(REPLAY_KEY_PREFIX) {
                return Err(ConfigError::at(
                    file,
                    "cluster.worker_id",
                    format!(
                        "must not start with `{}` (the cluster topic's replay records are keyed so)",
                        REPLAY_KEY_PREFIX
                    ),
                ));
            }
        }
        if self.publish_interval_ms == 0 || self.publish_interval_ms > 60_000 {
            return Err(ConfigError::at(
                file,
                "cluster.publish_interval_ms",
                "must be between 1 and 60000",
            ));
        }
        if self.forward_timeout_ms == 0 || self.forward_timeout_ms > 600_000 {
            return Err(ConfigError::at(
                file,
                "cluster.forward_timeout_ms",
                "must be between 1 and 600000",
            ));
        }
        Ok(())
    }
}

/// `kafka.partitioner`: how the producers chose a record's partition from its
/// key, so a read of a key can go to the worker that owns that partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// Kafka's Java clients: `murmur2(key) & 0x7fffffff % partitions`.
    Murmur2,
    /// librdkafka clients (confluent-kafka for Python, Go, .NET; rdkafka):
    /// `crc32(key) % partitions`.
    Crc32,
    /// Unknown: a read asks the owners of every partition.
    #[default]
    Any,
}
