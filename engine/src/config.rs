//! Deployment configuration: one TOML file, overridden by `PROJECTOR__SECTION__KEY`
//! environment variables.
//!
//! Layers, last wins: the defaults written on each field, the file, the environment.
//! Unknown keys are refused. Every error names the key and the file it came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// Prefix of environment variables that override file values; `__` separates levels,
/// so `PROJECTOR__KAFKA__BROKERS` sets `kafka.brokers`.
pub const ENV_PREFIX: &str = "PROJECTOR__";

mod cluster;
mod dedup;
mod http;
mod projection;

pub use cluster::{ClusterConfig, Partitioner, REPLAY_KEY_PREFIX};
pub use dedup::DedupConfig;
pub use http::{HttpConfig, ReadTokens, TlsConfig};
pub use projection::{definition_topics, PoisonPolicy, ProjectionConfig, ProjectionDefinition};

/// The whole deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach Kafka and consume from it.
    pub kafka: KafkaConfig,
    /// The Confluent-compatible schema registry that holds writer schemas.
    pub registry: RegistryConfig,
    /// Where projection state lives and how it is committed.
    pub store: StoreConfig,
    /// The HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Where the reader (current) event schemas live.
    #[serde(default)]
    pub schemas: SchemasConfig,
    /// How replays run and when they switch.
    #[serde(default)]
    pub replay: ReplayConfig,
    /// The projections this worker maintains.
    #[serde(default)]
    pub projections: Vec<ProjectionConfig>,
    /// Multi-worker mode; a worker runs alone without it.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `[replay]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// A replay hands over to become live once its lag behind the high watermarks,
    /// summed over partitions, is at most this many events.
    #[serde(default = "default_switch_lag_events")]
    pub switch_lag_events: i64,
    /// Caps a replay's fold rate so it leaves the broker and disk to the live
    /// generations; unlimited when absent.
    #[serde(default)]
    pub max_events_per_second: Option<u32>,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            switch_lag_events: default_switch_lag_events(),
            max_events_per_second: None,
        }
    }
}

fn default_switch_lag_events() -> i64 {
    1_000
}

/// `[kafka]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Consumer group of a projection is `<group_prefix>.<projection name>`.
    #[serde(default = "default_group_prefix")]
    pub group_prefix: String,
    /// Raw librdkafka properties, passed through untouched (SASL, TLS, timeouts).
    /// They are applied after Projector's own settings, so they win.
    #[serde(default)]
    pub librdkafka_options: BTreeMap<String, String>,
    /// How the producers chose partitions from keys: `murmur2` (Java clients),
    /// `crc32` (librdkafka clients) or `any` (unknown). In multi-worker mode a
    /// read of a projection with `keyed_like_topic` goes to the owner of the
    /// key's partition; with `any` it asks every owner.
    #[serde(default)]
    pub partitioner: Partitioner,
    /// Fold consumers join with this `group.instance.id` (static membership);
    /// set from `cluster.static_membership`, never from the file.
    #[serde(skip)]
    pub group_instance_id: Option<String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .librdkafka_options
            .iter()
            .map(|(k, v)| {
                let secret = k.contains("password") || k.contains("secret") || k.contains("key");
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_prefix", &self.group_prefix)
            .field("librdkafka_options", &options)
            .field("partitioner", &self.partitioner)
            .field("group_instance_id", &self.group_instance_id)
            .finish()
    }
}

fn default_group_prefix() -> String {
    "projector".to_owned()
}

/// `[registry]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the schema registry REST API.
    pub url: String,
    /// Basic-auth user name, if the registry needs one.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password (prefer `PROJECTOR__REGISTRY__PASSWORD` over the file).
    #[serde(default)]
    pub password: Option<String>,
    /// Timeout of one registry request.
    #[serde(default = "default_registry_timeout_ms")]
    pub timeout_ms: u64,
    /// Ceiling of the exponential backoff between retries while the registry is down.
    #[serde(default = "default_registry_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout_ms", &self.timeout_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .finish()
    }
}

fn default_registry_timeout_ms() -> u64 {
    5_000
}

fn default_registry_max_backoff_ms() -> u64 {
    10_000
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// RocksDB directory; created if missing. Relative paths are relative to the
    /// working directory.
    pub path: PathBuf,
    /// A batch is committed after this many events...
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// ...or this long after its first event, whichever comes first.
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// fsync the RocksDB write-ahead log on every batch. Off by default: a killed
    /// process loses nothing without it (the log is in the OS page cache); only a
    /// machine crash can lose the last batches, and those are re-read from Kafka
    /// because their offsets are lost with them.
    #[serde(default)]
    pub sync_writes: bool,
    /// Megabytes of committed states each fold loop keeps in memory across
    /// batches (an estimate of their heap), so a key folded again soon is not read
    /// from RocksDB and parsed again. Each live generation, and a replay's beside
    /// it, has one; projections that share a source split it among them. 0 turns
    /// the cache off.
    #[serde(default = "default_state_cache_mb")]
    pub state_cache_mb: usize,
    /// Files RocksDB keeps open at most (its `max_open_files`): part of the
    /// worker's file-descriptor budget (see `http.max_connections`).
    #[serde(default = "default_max_open_files")]
    pub max_open_files: u32,
}

fn default_max_open_files() -> u32 {
    256
}

impl StoreConfig {
    /// [`StoreConfig::state_cache_mb`] in bytes.
    pub fn state_cache_bytes(&self) -> usize {
        self.state_cache_mb.saturating_mul(1 << 20)
    }
}

fn default_state_cache_mb() -> usize {
    128
}

fn default_batch_max_events() -> usize {
    5_000
}

fn default_batch_max_wait_ms() -> u64 {
    100
}

/// `[schemas]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemasConfig {
    /// Directory of `.avsc` reader schemas, one sub-directory per namespace.
    #[serde(default = "default_schemas_dir")]
    pub dir: PathBuf,
}

impl Default for SchemasConfig {
    fn default() -> Self {
        SchemasConfig {
            dir: default_schemas_dir(),
        }
    }
}

fn default_schemas_dir() -> PathBuf {
    PathBuf::from("schemas")
}

/// A configuration that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// An error about `key` of the configuration in `file`.
    pub fn at(file: &Path, key: &str, message: impl std::fmt::Display) -> Self {
        ConfigError(format!("config {}: key `{key}`: {message}", file.display()))
    }
}

impl Config {
    /// Loads `file`, applies environment overrides and checks cross-field rules.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(file, Env::prefixed(ENV_PREFIX).split("__"))
    }

    fn load_with_env(file: &Path, env: Env) -> Result<Config, ConfigError> {
        if !file.is_file() {
            return Err(ConfigError(format!("config {}: file not found", file.display())));
        }
        let config: Config = Figment::new()
            .merge(Toml::file_exact(file))
            .merge(env)
            .extract()
            .map_err(|errors| {
                let all: Vec<String> = errors
                    .into_iter()
                    .map(|e| describe_figment_error(file, e))
                    .collect();
                ConfigError(all.join("\n"))
            })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::at(file, "kafka.brokers", "must not be empty"));
        }
        if !(self.registry.url.starts_with("http://") || self.registry.url.starts_with("https://")) {
            return Err(ConfigError::at(
                file,
                "registry.url",
                format!("`{}` is not an http(s) URL", self.registry.url),
            ));
        }
        self.http.validate(file)?;
        if let Some(cluster) = &self.cluster {
            cluster.validate(file)?;
        }
        if self.store.max_open_files < 16 {
            return Err(ConfigError::at(
                file,
                "store.max_open_files",
                "must be at least 16",
            ));
        }
        if self.store.batch_max_events == 0 {
            return Err(ConfigError::at(
                file,
                "store.batch_max_events",
                "must be at least 1",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (index, projection) in self.projections.iter().enumerate() {
            let key = |field: &str| format!("projections[{index}].{field}");
            if !is_valid_name(&projection.name) {
                return Err(ConfigError::at(
                    file,
                    &key("name"),
                    format!(
                        "`{}` is not a valid name (use letters, digits, `_`, `-`, `.`)",
                        projection.name
                    ),
                ));
            }
            if !seen.insert(projection.name.as_str()) {
                return Err(ConfigError::at(
                    file,
                    &key("name"),
                    format!("projection `{}` is defined twice", projection.name),
                ));
            }
            if projection.kind.is_some() == projection.declarative.is_some() {
                return Err(ConfigError::at(
                    file,
                    &key("kind"),
                    format!(
                        "projection `{}` needs exactly one of `kind` and `declarative`",
                        projection.name
                    ),
                ));
            }
            if projection.topics.is_empty() {
                return Err(ConfigError::at(file, &key("topics"), "needs at least one topic"));
            }
            if projection.on_poison == PoisonPolicy::DeadLetter {
                match &projection.dead_letter_topic {
                    None => {
                        return Err(ConfigError::at(
                            file,
                            &key("dead_letter_topic"),
                            "is required when on_poison = \"dead_letter\"",
                        ))
                    }
                    Some(topic) if !is_valid_name(topic) || projection.topics.contains(topic) => {
                        return Err(ConfigError::at(
                            file,
                            &key("dead_letter_topic"),
                            format!("`{topic}` is not a valid topic name distinct from the source topics"),
                        ))
                    }
                    Some(_) => {}
                }
            }
            if let Some(dedup) = &projection.dedup {
                dedup.validate(file, index)?;
            }
            if let Some(event_time) = &projection.event_time {
                crate::expr::Expr::compile(event_time)
                    .map_err(|e| ConfigError::at(file, &key("event_time"), e))?;
            }
            if let Some(bad) = projection.topics.iter().find(|t| !is_valid_name(t)) {
                return Err(ConfigError::at(
                    file,
                    &key("topics"),
                    format!("`{bad}` is not a valid topic name"),
                ));
            }
        }
        Ok(())
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn describe_figment_error(file: &Path, error: figment::Error) -> String {
    let key = if error.path.is_empty() {
        None
    } else {
        Some(error.path.join("."))
    };
    let origin = match error.metadata.as_ref().map(|m| m.name.as_ref()) {
        Some(name) if name.contains("environment") || name.contains("env") => {
            format!("environment ({ENV_PREFIX}*)")
        }
        _ => format!("config {}", file.display()),
    };
    let mut kind = error.kind.to_string();
    if let figment::error::Kind::UnknownField(field, _) = &error.kind {
        kind = format!("unknown key `{field}`");
    }
    match key {
        Some(key) => format!("{origin}: key `{key}`: {kind}"),
        None => format!("{origin}: {kind}"),
    }
}

#[cfg(test)]
mod tests;
