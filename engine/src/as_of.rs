//! Projections as of a past time: a frozen generation beside the live one that,
//! in each source partition, folds every event whose time is at or before
//! `until`, reading up to the high watermark seen when it was requested, then
//! stops and keeps its state ([`crate::store::AsOfRecord`] in the store).
//!
//! An event's time is its record timestamp, or the projection's `event_time`
//! expression. Events after `until`, and events at or past a partition's target
//! (written after the request), are passed over: their offsets advance, their
//! events are not folded. Reads name the generation by its `until`
//! (`?at=<until>`); the live generation is never touched.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value as Json};

use crate::config::KafkaConfig;
use crate::kafka_client::{self, Role};
use crate::store::{AsOfRecord, SourcePartition};

/// What an as-of generation's loop folds up to, and whether it got there.
#[derive(Debug)]
pub struct AsOfSpec {
    /// Events at or before this time (ms since the epoch) are folded.
    pub until_ms: i64,
    /// Per partition, the (low, high) watermarks at the request: read up to high.
    pub targets: BTreeMap<SourcePartition, (i64, i64)>,
    /// When it was requested, in seconds since the epoch.
    pub requested_at: u64,
    complete: AtomicBool,
}

impl AsOfSpec {
    /// From the store's record.
    pub fn from_record(record: &AsOfRecord) -> AsOfSpec {
        let targets = record
            .targets
            .iter()
            .filter_map(|(name, range)| Some((parse_partition(name)?, *range)))
            .collect();
        AsOfSpec {
            until_ms: record.until_ms,
            targets,
            requested_at: record.requested_at,
            complete: AtomicBool::new(record.complete),
        }
    }

    /// True once every partition reached its target: the state is final.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    pub(crate) fn set_complete(&self) {
        self.complete.store(true, Ordering::SeqCst);
    }

    /// True when the event at `offset` of `partition` was written after the
    /// request (at or past the partition's target), or in a partition the
    /// request did not see.
    pub fn is_past_target(&self, partition: &SourcePartition, offset: i64) -> bool {
        self.targets
            .get(partition)
            .is_none_or(|(_, high)| offset >= *high)
    }

    /// True when a partition whose next offset is `next` has nothing more to fold.
    pub fn reached(&self, partition: &SourcePartition, next: i64) -> bool {
        self.targets
            .get(partition)
            .is_none_or(|(low, high)| low >= high || next >= *high)
    }

    /// `until` as RFC 3339 text (UTC, milliseconds).
    pub fn until_text(&self) -> String {
        format_instant(self.until_ms)
    }

    /// Its progress given the generation's stored next offsets: events read of
    /// those to read.
    pub fn progress(&self, offsets: &BTreeMap<SourcePartition, i64>) -> Json {
        let (mut read, mut target) = (0i64, 0i64);
        for (partition, (low, high)) in &self.targets {
            let next = offsets
                .get(partition)
                .copied()
                .unwrap_or(*low)
                .clamp(*low, (*high).max(*low));
            read = read.saturating_add(next.saturating_sub(*low));
            target = target.saturating_add(high.saturating_sub(*low).max(0));
        }
        json!({ "read": read, "target": target })
    }
}

/// RFC 3339 text (`2026-06-30T23:59:59.000Z`) as ms since the epoch.
pub fn parse_instant(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Ms since the epoch as RFC 3339 text in UTC with milliseconds.
pub fn format_instant(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn parse_partition(name: &str) -> Option<SourcePartition> {
    let (topic, partition) = name.rsplit_once('/')?;
    Some(SourcePartition {
        topic: topic.into(),
        partition: partition.parse().ok()?,
    })
}

/// The (low, high) watermarks of every partition of `topics` now, for a new
/// as-of generation's targets.
pub fn targets_now(kafka: &KafkaConfig, topics: &[String]) -> Result<BTreeMap<String, (i64, i64)>, String> {
    let client: BaseConsumer = kafka_client::config(kafka, Role::Metadata)
        .create()
        .map_err(|e| format!("creating a Kafka client: {e}"))?;
    let mut targets = BTreeMap::new();
    for topic in topics {
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("the partitions of `{topic}`: {e}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(format!("topic `{topic}` has no partitions (does it exist?)"));
        }
        for partition in partitions {
            let range = client
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .map_err(|e| format!("the watermarks of {topic}/{partition}: {e}"))?;
            targets.insert(format!("{topic}/{partition}"), range);
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_and_targets_bound_the_read() {
        let until = parse_instant("2026-06-30T23:59:59.000Z").unwrap();
        assert_eq!(format_instant(until), "2026-06-30T23:59:59.000Z");
        assert_eq!(parse_instant("2026-07-01T01:59:59+02:00"), Some(until));
        assert_eq!(parse_instant("June"), None);
        let record = AsOfRecord {
            generation: 2,
            until_ms: until,
            targets: [("orders/0".to_owned(), (0, 10)), ("orders/1".to_owned(), (5, 5))].into(),
            complete: false,
            requested_at: 0,
        };
        let spec = AsOfSpec::from_record(&record);
        let p0 = SourcePartition {
            topic: "orders".into(),
            partition: 0,
        };
        let p1 = SourcePartition {
            topic: "orders".into(),
            partition: 1,
        };
        assert!(!spec.is_past_target(&p0, 9) && spec.is_past_target(&p0, 10));
        assert!(!spec.reached(&p0, 9) && spec.reached(&p0, 10));
        assert!(spec.reached(&p1, 0), "an empty partition has nothing to read");
        assert_eq!(spec.progress(&[(p0, 4)].into()), json!({"read": 4, "target": 10}));
    }
}
