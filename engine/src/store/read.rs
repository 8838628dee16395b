//! Consistent reads for the HTTP API: every value and offset of one answer comes
//! from the same RocksDB snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use rocksdb::{BoundColumnFamily, IteratorMode};

use super::keys::{decode_offset_in, hex, push_escaped, state_prefix, unescape_next};
use super::{failed, Db, Generation, SourcePartition, Store, StoreError};

/// A consistent view of one generation for reads: every value and offset it
/// returns comes from the same RocksDB snapshot.
pub struct ReadView<'a> {
    snapshot: rocksdb::SnapshotWithThreadMode<'a, Db>,
    cf: Arc<BoundColumnFamily<'a>>,
    column_family: String,
}

/// The partial states of one key, as stored (the projection decodes them), and
/// the source partition of each.
pub type KeyPartials = (String, Vec<Vec<u8>>, Vec<SourcePartition>);

impl Store {
    /// A snapshot of `generation` for reads.
    pub fn read_view(&self, generation: &Generation) -> Result<ReadView<'_>, StoreError> {
        Ok(ReadView {
            cf: self.cf(generation)?,
            snapshot: self.db.snapshot(),
            column_family: generation.column_family(),
        })
    }
}

impl ReadView<'_> {
    /// Every committed next offset, as of the snapshot.
    pub fn offsets(&self) -> Result<BTreeMap<SourcePartition, i64>, StoreError> {
        let mut offsets = BTreeMap::new();
        let rows = self
            .snapshot
            .iterator_cf(&self.cf, IteratorMode::From(b"o", rocksdb::Direction::Forward));
        for item in rows {
            let (key, value) = item.map_err(failed("scanning offsets"))?;
            if !key.starts_with(b"o") {
                break;
            }
            let mut rest = &key[1..];
            let topic = unescape_next(&mut rest);
            let partition = rest.try_into().ok().map(i32::from_be_bytes);
            let (Some(topic), Some(partition)) = (topic, partition) else {
                return Err(StoreError {
                    context: format!("offset row {} of {}", hex(&key), self.column_family),
                    source: "the row's key names no topic and partition".into(),
                });
            };
            let partition = SourcePartition {
                topic: String::from_utf8_lossy(&topic).into_owned().into(),
                partition,
            };
            let next = decode_offset_in(&self.column_family, &partition, &value)?;
            offsets.insert(partition, next);
        }
        Ok(offsets)
    }

    /// The partial states of `key`.
    pub fn partials(&self, key: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .partials_by_partition(key)?
            .into_iter()
            .map(|(_, partial)| partial)
            .collect())
    }

    /// The partial states of `key` with the source partition of each.
    pub fn partials_by_partition(&self, key: &str) -> Result<Vec<(SourcePartition, Vec<u8>)>, StoreError> {
        let prefix = state_prefix(key);
        let mut partials = Vec::new();
        let rows = self
            .snapshot
            .iterator_cf(&self.cf, IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        for item in rows {
            let (row, value) = item.map_err(failed(format!("reading `{key}`")))?;
            if !row.starts_with(&prefix) {
                break;
            }
            let partition = self.row_partition(&row, &row[prefix.len()..])?;
            partials.push((partition, value.into_vec()));
        }
        Ok(partials)
    }

    /// The source partition named by `rest`, the end of the state row `row`.
    fn row_partition(&self, row: &[u8], mut rest: &[u8]) -> Result<SourcePartition, StoreError> {
        let topic = unescape_next(&mut rest);
        let partition = <[u8; 4]>::try_from(rest).ok().map(i32::from_be_bytes);
        let (Some(topic), Some(partition)) = (topic, partition) else {
            return Err(StoreError {
                context: format!("state row {} of {}", hex(row), self.column_family),
                source: "the row's key names no topic and partition".into(),
            });
        };
        Ok(SourcePartition {
            topic: String::from_utf8_lossy(&topic).into_owned().into(),
            partition,
        })
    }

    /// Keys starting with `prefix`, in key order, strictly after `after` when given;
    /// at most `limit` keys, each with its partials (only those of `only`'s
    /// partitions when given; a key without any is passed over). `accept`
    /// filters keys (hidden bookkeeping keys do not count toward the limit).
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        only: Option<&std::collections::BTreeSet<SourcePartition>>,
        accept: &mut dyn FnMut(&str, &[Vec<u8>]) -> bool,
    ) -> Result<Vec<KeyPartials>, StoreError> {
        let mut start = vec![b's'];
        let mut escaped_prefix = Vec::new();
        push_escaped(&mut escaped_prefix, prefix.as_bytes());
        escaped_prefix.truncate(escaped_prefix.len() - 2);
        start.extend_from_slice(&escaped_prefix);
        if let Some(after) = after {
            let after_start = state_prefix(after);
            if after_start > start {
                start = after_start;
            }
        }
        let rows = self
            .snapshot
            .iterator_cf(&self.cf, IteratorMode::From(&start, rocksdb::Direction::Forward));
        let mut found: Vec<KeyPartials> = Vec::new();
        let mut current: Option<KeyPartials> = None;
        for item in rows {
            let (row, value) = item.map_err(failed("scanning state"))?;
            if !row.starts_with(b"s") || !row[1..].starts_with(&escaped_prefix) {
                break;
            }
            let mut rest = &row[1..];
            let Some(key) = unescape_next(&mut rest) else {
                continue;
            };
            let key = String::from_utf8_lossy(&key).into_owned();
            if Some(key.as_str()) == after {
                continue;
            }
            let partition = self.row_partition(&row, rest)?;
            if only.is_some_and(|only| !only.contains(&partition)) {
                continue;
            }
            let partial = value.into_vec();
            match &mut current {
                Some((k, partials, partitions)) if *k == key => {
                    partials.push(partial);
                    partitions.push(partition);
                }
                _ => {
                    if let Some((k, partials, partitions)) = current.take() {
                        if accept(&k, &partials) {
                            found.push((k, partials, partitions));
                            if found.len() == limit {
                                return Ok(found);
                            }
                        }
                    }
                    current = Some((key, vec![partial], vec![partition]));
                }
            }
        }
        if let Some((k, partials, partitions)) = current {
            if found.len() < limit && accept(&k, &partials) {
                found.push((k, partials, partitions));
            }
        }
        Ok(found)
    }
}
