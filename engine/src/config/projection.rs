//! `[[projections]]`: one entry per projection, and the definition a generation
//! is built and recorded with.

use serde::Deserialize;

use super::DedupConfig;

/// One `[[projections]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionConfig {
    /// Unique name; used in URLs, metrics and the consumer group.
    pub name: String,
    /// Which built-in projection implements it (a name from the projections
    /// registry); set this or `declarative`.
    #[serde(default)]
    pub kind: Option<String>,
    /// A projection defined in config (CEL); set this or `kind`.
    #[serde(default)]
    pub declarative: Option<crate::declarative::DeclarativeConfig>,
    /// Source topics.
    pub topics: Vec<String>,
    /// Options of the built-in projection, checked by the projection itself.
    #[serde(default)]
    pub options: serde_json::Value,
    /// What to do with an event that cannot be decoded, upcast or folded.
    #[serde(default)]
    pub on_poison: PoisonPolicy,
    /// Topic that receives poison events when `on_poison = "dead_letter"`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Values larger than this are poison (`bad_frame`) rather than decoded.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Fold each event id once ([`DedupConfig`]); off when absent.
    #[serde(default)]
    pub dedup: Option<DedupConfig>,
    /// An event's time for as-of generations: a CEL expression over `event` and
    /// `meta` giving milliseconds since the epoch or RFC 3339 text (an Avro
    /// timestamp field gives its instant). The record timestamp when absent.
    #[serde(default)]
    pub event_time: Option<String>,
    /// Its state keys are the source records' message keys (as the producers
    /// wrote them), so a key lives in the partition `kafka.partitioner` gives it:
    /// in multi-worker mode a read of a key goes to that partition's owner only.
    /// Off: a read asks the owners of every partition and merges.
    #[serde(default)]
    pub keyed_like_topic: bool,
}

/// What decides a projection's state: the parts of its config a generation is
/// built with and recorded with (see [`crate::store`]). Changing any of them
/// takes a replay to reach the state already folded.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct ProjectionDefinition {
    /// Built-in kind.
    pub kind: Option<String>,
    /// Declarative definition.
    pub declarative: Option<crate::declarative::DeclarativeConfig>,
    /// Options of the built-in.
    pub options: serde_json::Value,
    /// Source topics.
    pub topics: Vec<String>,
}

impl ProjectionConfig {
    /// The definition this entry configures.
    pub fn definition(&self) -> serde_json::Value {
        let definition = ProjectionDefinition {
            kind: self.kind.clone(),
            declarative: self.declarative.clone(),
            options: if self.options.is_null() {
                serde_json::Value::Object(Default::default())
            } else {
                self.options.clone()
            },
            topics: self.topics.clone(),
        };
        serde_json::to_value(definition).expect("a definition serializes")
    }
}

/// The source topics of a recorded definition.
pub fn definition_topics(definition: &serde_json::Value) -> Vec<String> {
    serde_json::from_value::<ProjectionDefinition>(definition.clone())
        .map(|d| d.topics)
        .unwrap_or_default()
}

fn default_max_event_bytes() -> usize {
    1024 * 1024
}

/// What happens to a poison event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    /// Halt the projection at the event until an operator resumes or skips it.
    #[default]
    Stop,
    /// Log and count it, and go on.
    Skip,
    /// Write it to `dead_letter_topic` (original key, value, headers and the reason
    /// in `projector.*` headers), and go on once the broker acknowledged it.
    DeadLetter,
}
