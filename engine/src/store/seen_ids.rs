//! The event ids a generation has folded, per source partition, for projections
//! that fold each id once (`[projections.dedup]`). One row per id,
//! `d` + topic + partition + offset → 16-byte id digest + record timestamp (ms,
//! big-endian), written and deleted in the batch that folds the event (DESIGN.md
//! invariant 1): a crash neither forgets an id whose effect was committed nor
//! keeps one whose effect was lost.

use rocksdb::IteratorMode;

use super::keys::{hex, push_escaped};
use super::{failed, Generation, SourcePartition, Store, StoreError};

/// The length of an id's digest (the first bytes of its SHA-256).
pub const ID_DIGEST_BYTES: usize = 16;

/// One remembered id: where its event was and when it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenId {
    /// Offset of the event that carried it.
    pub offset: i64,
    /// The first 16 bytes of the SHA-256 of the id.
    pub digest: [u8; ID_DIGEST_BYTES],
    /// The event's record timestamp (ms since the epoch; 0 when it had none).
    pub timestamp_ms: i64,
}

pub(super) fn partition_prefix(partition: &SourcePartition) -> Vec<u8> {
    let mut out = vec![b'd'];
    push_escaped(&mut out, partition.topic.as_bytes());
    out.extend_from_slice(&partition.partition.to_be_bytes());
    out
}

pub(super) fn seen_key(partition: &SourcePartition, offset: i64) -> Vec<u8> {
    let mut out = partition_prefix(partition);
    out.extend_from_slice(&(offset as u64).to_be_bytes());
    out
}

pub(super) fn seen_value(seen: &SeenId) -> [u8; ID_DIGEST_BYTES + 8] {
    let mut out = [0u8; ID_DIGEST_BYTES + 8];
    out[..ID_DIGEST_BYTES].copy_from_slice(&seen.digest);
    out[ID_DIGEST_BYTES..].copy_from_slice(&seen.timestamp_ms.to_be_bytes());
    out
}

impl Store {
    /// The ids `generation` remembers for `partition`, oldest offset first.
    pub fn seen_ids(
        &self,
        generation: &Generation,
        partition: &SourcePartition,
    ) -> Result<Vec<SeenId>, StoreError> {
        let cf = self.cf(generation)?;
        let prefix = partition_prefix(partition);
        let mut seen = Vec::new();
        let rows = self
            .db
            .iterator_cf(&cf, IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        for item in rows {
            let (key, value) = item.map_err(failed(format!("reading the event ids of {partition}")))?;
            let Some(offset) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let damaged = || StoreError {
                context: format!(
                    "the event id row {} of {partition} in column family {}",
                    hex(&key),
                    generation.column_family()
                ),
                source: "it is not an offset with a 24-byte digest and timestamp; the store is \
                         damaged: `projector reset` rebuilds the projection from the log"
                    .into(),
            };
            let offset: [u8; 8] = offset.try_into().map_err(|_| damaged())?;
            let (digest, timestamp) = value.split_at_checked(ID_DIGEST_BYTES).ok_or_else(damaged)?;
            let timestamp: [u8; 8] = timestamp.try_into().map_err(|_| damaged())?;
            seen.push(SeenId {
                offset: i64::try_from(u64::from_be_bytes(offset)).map_err(|_| damaged())?,
                digest: digest.try_into().map_err(|_| damaged())?,
                timestamp_ms: i64::from_be_bytes(timestamp),
            });
        }
        Ok(seen)
    }
}
