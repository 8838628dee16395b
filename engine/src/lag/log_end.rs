//! Finding a log shorter than its stored offsets (the topic was recreated or
//! truncated) on brokers that do not say so (see [`check_logs_reach_offsets`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{debug, warn};

use super::Memory;
use crate::fold_state::{Command, Fold, LogBehind, RunState};
use crate::store::SourcePartition;

/// Probes in a row that must find a log short before the projection is stopped.
const SHORT_PROBES_TO_STOP: u32 = 2;

/// How long a probe waits for the record before a stored offset.
const PROBE_WAIT: Duration = Duration::from_secs(3);

/// Finds partitions whose log ends before their stored next offset (the topic was
/// recreated or truncated) and tells the fold loop, which stops with reason
/// `offsets_reset`. Kafka answers the consumer's fetch at such an offset with
/// `OFFSET_OUT_OF_RANGE` (the fold loop handles that itself); some brokers (Tansu)
/// answer with no records and no error, so the consumer would wait there and,
/// once new events pass the offset, fold them onto the old state. A stored offset
/// above the high watermark is the sign; as Tansu can report a high watermark
/// short of its log end, the record before the offset is fetched to confirm.
pub(super) fn check_logs_reach_offsets(
    probe: &BaseConsumer,
    name: &str,
    live: &Fold,
    watermarks: &[(SourcePartition, i64, i64)],
    stored: &BTreeMap<SourcePartition, i64>,
    memory: &mut Memory,
) {
    if !matches!(live.state(), RunState::Running) {
        return;
    }
    for (source, low, high) in watermarks {
        let key = (name.to_owned(), source.clone());
        let Some(&next) = stored.get(source).filter(|next| **next > *high) else {
            memory.log_short.remove(&key);
            continue;
        };
        if memory.log_reaches.get(&key) == Some(&(next, *high)) {
            continue;
        }
        match probe_log(probe, source, next, *high) {
            LogProbe::Reaches => {
                memory.log_reaches.insert(key.clone(), (next, *high));
                memory.log_short.remove(&key);
                continue;
            }
            LogProbe::Unknown => continue,
            LogProbe::Short => {}
        }
        let short = memory.log_short.entry(key).or_default();
        *short += 1;
        warn!(topic = %source.topic, partition = source.partition, offset = next, high,
            "the log of {source} seems to end before the stored offset {next} (probe {short})");
        if *short >= SHORT_PROBES_TO_STOP {
            live.tell(Command::LogBehind(LogBehind {
                partition: source.clone(),
                next,
                low: *low,
                high: *high,
            }));
        }
    }
}

/// What a probe found about a partition's log and a stored offset.
enum LogProbe {
    /// The record before the offset (or a later one) is there.
    Reaches,
    /// The log ends before the offset.
    Short,
    /// The broker did not say (slow, unreachable, mid leader change).
    Unknown,
}

/// Checks that the log of `partition` reaches `next`, its high watermark being
/// `high`. A broker that returns nothing for `next - 1` but the record at
/// `high - 1` serves the log and has nothing further: short.
fn probe_log(probe: &BaseConsumer, partition: &SourcePartition, next: i64, high: i64) -> LogProbe {
    if high <= 0 {
        // The brokers answered the watermark query: the log is empty.
        return LogProbe::Short;
    }
    match fetch_from(probe, partition, next - 1) {
        Some(true) => LogProbe::Reaches,
        Some(false) => LogProbe::Short,
        None => match fetch_from(probe, partition, high - 1) {
            Some(true) => LogProbe::Short,
            _ => LogProbe::Unknown,
        },
    }
}

/// Fetches from `offset`: `Some(true)` when a record at or after it comes back,
/// `Some(false)` when the broker says the offset is out of range, `None` when
/// nothing comes within [`PROBE_WAIT`].
fn fetch_from(probe: &BaseConsumer, partition: &SourcePartition, offset: i64) -> Option<bool> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&partition.topic, partition.partition, Offset::Offset(offset))
        .ok()?;
    probe.assign(&assignment).ok()?;
    let deadline = Instant::now() + PROBE_WAIT;
    let mut found = None;
    while Instant::now() < deadline {
        match probe.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                found = Some(message.offset() >= offset);
                break;
            }
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) => {
                found = Some(false);
                break;
            }
            Some(Err(e)) => debug!(error = %e, "log probe"),
            None => {}
        }
    }
    let _ = probe.unassign();
    found
}
