//! `[projections.dedup]`: where a projection finds each event's id, and how many
//! ids it remembers, so an event written twice at two offsets is folded once.

use std::path::Path;

use serde::Deserialize;

use super::ConfigError;

/// `[projections.dedup]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// The event id is this Kafka header's value (`ce_id` for CloudEvents);
    /// set this or `id`.
    #[serde(default)]
    pub header: Option<String>,
    /// The event id is this CEL expression over `event` and `meta` (for example
    /// `event.eventId`); set this or `header`.
    #[serde(default)]
    pub id: Option<String>,
    /// Ids remembered per source partition: the most recent ones, by offset.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Also forget ids whose record timestamp is more than this many seconds
    /// older than the newest remembered one of their partition.
    #[serde(default)]
    pub max_age_seconds: Option<u64>,
}

fn default_window() -> usize {
    100_000
}

impl DedupConfig {
    /// Checks the table of projection `index`.
    pub(super) fn validate(&self, file: &Path, index: usize) -> Result<(), ConfigError> {
        let key = |field: &str| format!("projections[{index}].dedup.{field}");
        match (&self.header, &self.id) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ConfigError::at(
                    file,
                    &key("header"),
                    "set exactly one of `header` and `id`",
                ))
            }
            (Some(header), None) if header.is_empty() => {
                return Err(ConfigError::at(file, &key("header"), "must not be empty"))
            }
            (None, Some(id)) => {
                crate::expr::Expr::compile(id).map_err(|e| ConfigError::at(file, &key("id"), e))?;
            }
            _ => {}
        }
        if self.window == 0 {
            return Err(ConfigError::at(file, &key("window"), "must be at least 1"));
        }
        if self.max_age_seconds == Some(0) {
            return Err(ConfigError::at(
                file,
                &key("max_age_seconds"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
