//! Projection state in RocksDB.
//!
//! Each generation of a projection has its own column family `<projection>@<n>`.
//! Inside it:
//! - state rows, `s` + key + source topic + source partition → JSON partial state;
//! - offsets, `o` + topic + partition → next offset to apply (i64, big-endian).
//!
//! Keys and topics are escaped (`0x00` → `0x00 0xFF`) and end with `0x00 0x00`, so
//! rows sort by key and every partial of one key shares a prefix. The default column
//! family holds, per projection, which generation is live (`live/<projection>`),
//! which one a replay is building (`replay/<projection>`), and the definition each
//! generation folds with (`definition/<projection>@<n>`). A replay's switch is one
//! write of the first two (DESIGN.md invariant 3).
//!
//! A batch's state rows and offsets go in one `WriteBatch` (DESIGN.md invariant 1).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BoundColumnFamily, DBWithThreadMode, IteratorMode, MultiThreaded, Options, WriteBatch, WriteOptions,
};
use serde_json::Value as Json;

type Db = DBWithThreadMode<MultiThreaded>;

/// A RocksDB failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("store: {context}: {source}")]
pub struct StoreError {
    context: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    /// True for RocksDB I/O errors (a full or read-only disk, a failing device):
    /// the kind a writer can wait out.
    pub fn is_io(&self) -> bool {
        self.source
            .downcast_ref::<rocksdb::Error>()
            .is_some_and(|e| matches!(e.kind(), rocksdb::ErrorKind::IOError))
    }
}

fn failed<E: std::error::Error + Send + Sync + 'static>(
    context: impl Into<String>,
) -> impl FnOnce(E) -> StoreError {
    let context = context.into();
    move |source| StoreError {
        context,
        source: Box::new(source),
    }
}

/// A source partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl std::fmt::Display for SourcePartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One generation of one projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Projection name.
    pub projection: String,
    /// Generation number, from 1.
    pub number: u64,
}

impl Generation {
    /// Name of its column family, `<projection>@<n>`.
    pub fn column_family(&self) -> String {
        format!("{}@{}", self.projection, self.number)
    }
}

/// What one batch changes: partial states (`None` deletes) and the next offset of
/// each partition it read.
#[derive(Debug, Default)]
pub struct BatchWrite {
    /// Partial state rows by (key, source partition).
    pub rows: Vec<(String, SourcePartition, Option<Json>)>,
    /// Next offset to apply, per partition.
    pub offsets: BTreeMap<SourcePartition, i64>,
}

/// The RocksDB database of one worker.
pub struct Store {
    db: Db,
    write_options: WriteOptions,
    /// Names of the column families, which RocksDB does not list on an open handle.
    column_families: std::sync::Mutex<Vec<String>>,
}

const LIVE_PREFIX: &[u8] = b"live/";
const REPLAY_PREFIX: &[u8] = b"replay/";
const DEFINITION_PREFIX: &[u8] = b"definition/";

fn pointer_key(prefix: &[u8], projection: &str) -> Vec<u8> {
    [prefix, projection.as_bytes()].concat()
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, sync_writes: bool) -> Result<Store, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let existing = if path.join("CURRENT").exists() {
            Db::list_cf(&options, path)
                .map_err(failed(format!("listing column families in {}", path.display())))?
        } else {
            Vec::new()
        };
        let descriptors = existing
            .iter()
            .map(|name| rocksdb::ColumnFamilyDescriptor::new(name, generation_options()));
        let db = Db::open_cf_descriptors(&options, path, descriptors)
            .map_err(failed(format!("opening {}", path.display())))?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync_writes);
        Ok(Store {
            db,
            write_options,
            column_families: std::sync::Mutex::new(existing),
        })
    }

    /// The live generation of `projection`, creating generation 1 on first use.
    pub fn live_generation(&self, projection: &str) -> Result<Generation, StoreError> {
        let number = match self.pointer(LIVE_PREFIX, projection)? {
            Some(number) => number,
            None => {
                self.db
                    .put(pointer_key(LIVE_PREFIX, projection), 1u64.to_be_bytes())
                    .map_err(failed("recording generation 1"))?;
                1
            }
        };
        let generation = Generation {
            projection: projection.to_owned(),
            number,
        };
        self.ensure_column_family(&generation)?;
        Ok(generation)
    }

    /// Drops every generation of `projection` (state, offsets, definitions) and
    /// forgets which was live or replaying, so its next run rebuilds it from
    /// offset 0. Returns the column families dropped.
    pub fn reset(&self, projection: &str) -> Result<Vec<String>, StoreError> {
        let mut dropped = Vec::new();
        for number in self.generation_numbers(projection) {
            let generation = Generation {
                projection: projection.to_owned(),
                number,
            };
            self.drop_generation(&generation)?;
            dropped.push(generation.column_family());
        }
        let mut write = WriteBatch::default();
        write.delete(pointer_key(LIVE_PREFIX, projection));
        write.delete(pointer_key(REPLAY_PREFIX, projection));
        self.db
            .write(write)
            .map_err(failed("forgetting the live generation"))?;
        Ok(dropped)
    }

    /// The generation numbers of `projection` that have a column family, ascending.
    pub fn generation_numbers(&self, projection: &str) -> Vec<u64> {
        let prefix = format!("{projection}@");
        let mut numbers: Vec<u64> = self
            .column_families
            .lock()
            .expect("cf list lock")
            .iter()
            .filter_map(|name| name.strip_prefix(&prefix)?.parse().ok())
            .collect();
        numbers.sort_unstable();
        numbers
    }

    /// Drops one generation: its column family (state and offsets) and its
    /// recorded definition.
    pub fn drop_generation(&self, generation: &Generation) -> Result<(), StoreError> {
        let name = generation.column_family();
        if self.db.cf_handle(&name).is_some() {
            self.db
                .drop_cf(&name)
                .map_err(failed(format!("dropping column family {name}")))?;
        }
        self.column_families
            .lock()
            .expect("cf list lock")
            .retain(|n| *n != name);
        self.db
            .delete(pointer_key(DEFINITION_PREFIX, &name))
            .map_err(failed(format!("forgetting the definition of {name}")))
    }

    /// Drops the generations of `projection` that are neither live nor being
    /// replayed (left by a crash between a switch or an abort and the drop).
    /// Returns the column families dropped.
    pub fn drop_orphans(&self, projection: &str) -> Result<Vec<String>, StoreError> {
        let live = self.pointer(LIVE_PREFIX, projection)?;
        let replay = self.pointer(REPLAY_PREFIX, projection)?;
        let mut dropped = Vec::new();
        for number in self.generation_numbers(projection) {
            if Some(number) != live && Some(number) != replay {
                let generation = Generation {
                    projection: projection.to_owned(),
                    number,
                };
                self.drop_generation(&generation)?;
                dropped.push(generation.column_family());
            }
        }
        Ok(dropped)
    }

    fn pointer(&self, prefix: &[u8], projection: &str) -> Result<Option<u64>, StoreError> {
        let bytes = self
            .db
            .get(pointer_key(prefix, projection))
            .map_err(failed(format!("reading the generation pointers of {projection}")))?;
        bytes
            .map(|b| {
                decode_u64(&b).ok_or_else(|| StoreError {
                    context: format!("generation pointer of {projection}"),
                    source: "corrupt generation number".into(),
                })
            })
            .transpose()
    }

    /// The generation a replay of `projection` is building, if one is.
    pub fn replay_generation(&self, projection: &str) -> Result<Option<Generation>, StoreError> {
        Ok(self.pointer(REPLAY_PREFIX, projection)?.map(|number| Generation {
            projection: projection.to_owned(),
            number,
        }))
    }

    /// Starts a replay: creates the next generation (one above every existing
    /// one), records the definition it folds with, and marks it as the
    /// projection's replay so a restarted worker resumes it.
    pub fn begin_replay(&self, projection: &str, definition: &Json) -> Result<Generation, StoreError> {
        let live = self.live_generation(projection)?;
        let highest = self.generation_numbers(projection).last().copied().unwrap_or(0);
        let generation = Generation {
            projection: projection.to_owned(),
            number: highest.max(live.number) + 1,
        };
        self.ensure_column_family(&generation)?;
        self.record_definition(&generation, definition)?;
        self.db
            .put(
                pointer_key(REPLAY_PREFIX, projection),
                generation.number.to_be_bytes(),
            )
            .map_err(failed(format!(
                "marking {} as replaying",
                generation.column_family()
            )))?;
        Ok(generation)
    }

    /// Makes the replayed generation live: one atomic write moves the live pointer
    /// to it and clears the replay mark. The old generation is left for the caller
    /// to drop.
    pub fn switch_live(&self, replayed: &Generation) -> Result<(), StoreError> {
        let mut write = WriteBatch::default();
        write.put(
            pointer_key(LIVE_PREFIX, &replayed.projection),
            replayed.number.to_be_bytes(),
        );
        write.delete(pointer_key(REPLAY_PREFIX, &replayed.projection));
        self.db
            .write_opt(write, &self.write_options)
            .map_err(failed(format!("switching to {}", replayed.column_family())))
    }

    /// Clears the replay mark of `projection` (an aborted replay); its generation
    /// is left for the caller to drop.
    pub fn end_replay(&self, projection: &str) -> Result<(), StoreError> {
        self.db
            .delete(pointer_key(REPLAY_PREFIX, projection))
            .map_err(failed(format!("clearing the replay mark of {projection}")))
    }

    /// The definition `generation` folds with, as recorded when it was created.
    pub fn definition(&self, generation: &Generation) -> Result<Option<Json>, StoreError> {
        let name = generation.column_family();
        let bytes = self
            .db
            .get(pointer_key(DEFINITION_PREFIX, &name))
            .map_err(failed(format!("reading the definition of {name}")))?;
        bytes
            .map(|b| serde_json::from_slice(&b).map_err(failed(format!("decoding the definition of {name}"))))
            .transpose()
    }

    /// Records the definition `generation` folds with.
    pub fn record_definition(&self, generation: &Generation, definition: &Json) -> Result<(), StoreError> {
        let name = generation.column_family();
        let bytes = serde_json::to_vec(definition).map_err(failed("encoding a definition"))?;
        self.db
            .put(pointer_key(DEFINITION_PREFIX, &name), bytes)
            .map_err(failed(format!("recording the definition of {name}")))
    }

    fn ensure_column_family(&self, generation: &Generation) -> Result<(), StoreError> {
        let name = generation.column_family();
        if self.db.cf_handle(&name).is_none() {
            self.db
                .create_cf(&name, &generation_options())
                .map_err(failed(format!("creating column family {name}")))?;
            self.column_families.lock().expect("cf list lock").push(name);
        }
        Ok(())
    }

    fn cf(&self, generation: &Generation) -> Result<Arc<BoundColumnFamily<'_>>, StoreError> {
        let name = generation.column_family();
        self.db.cf_handle(&name).ok_or_else(|| StoreError {
            context: format!("column family {name}"),
            source: "missing".into(),
        })
    }

    /// Next offset to apply for one partition, if any batch of it was committed.
    pub fn next_offset(
        &self,
        generation: &Generation,
        partition: &SourcePartition,
    ) -> Result<Option<i64>, StoreError> {
        let cf = self.cf(generation)?;
        let bytes = self
            .db
            .get_cf(&cf, offset_key(partition))
            .map_err(failed(format!("reading offset of {partition}")))?;
        Ok(bytes.and_then(|b| decode_u64(&b)).map(|n| n as i64))
    }

    /// Every committed offset of a generation.
    pub fn offsets(&self, generation: &Generation) -> Result<BTreeMap<SourcePartition, i64>, StoreError> {
        self.read_view(generation)?.offsets()
    }

    /// The partial state of `key` from one source partition.
    pub fn partial(
        &self,
        generation: &Generation,
        key: &str,
        partition: &SourcePartition,
    ) -> Result<Option<Json>, StoreError> {
        let cf = self.cf(generation)?;
        // (Error contexts are formatted only on error: this runs for every event.)
        // Pinned: parsed straight from RocksDB's block or memtable, not a copy.
        let bytes = self
            .db
            .get_pinned_cf(&cf, state_key(key, partition))
            .map_err(|e| failed(format!("reading `{key}` of {partition}"))(e))?;
        bytes
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| failed(format!("decoding `{key}` of {partition}"))(e))
            })
            .transpose()
    }

    /// Writes one batch atomically: state rows and offsets together.
    pub fn commit(&self, generation: &Generation, batch: &BatchWrite) -> Result<(), StoreError> {
        let cf = self.cf(generation)?;
        let mut rows: Vec<(Vec<u8>, &Option<Json>)> = batch
            .rows
            .iter()
            .map(|(key, partition, state)| (state_key(key, partition), state))
            .collect();
        // In key order, each memtable insert starts its search where the last one
        // ended instead of at the top of the skip list.
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut write = WriteBatch::default();
        let mut encoded = Vec::new();
        for (row, state) in rows {
            match state {
                Some(state) => {
                    encoded.clear();
                    serde_json::to_writer(&mut encoded, state).map_err(failed("encoding state"))?;
                    write.put_cf(&cf, row, &encoded);
                }
                None => write.delete_cf(&cf, row),
            }
        }
        for (partition, next) in &batch.offsets {
            write.put_cf(&cf, offset_key(partition), (*next as u64).to_be_bytes());
        }
        self.db
            .write_opt(write, &self.write_options)
            .map_err(failed(format!("committing a batch of {}", generation.projection)))
    }
}

/// A consistent view of one generation for reads: every value and offset it
/// returns comes from the same RocksDB snapshot.
pub struct ReadView<'a> {
    snapshot: rocksdb::SnapshotWithThreadMode<'a, Db>,
    cf: Arc<BoundColumnFamily<'a>>,
}

/// The partial states of one key, as stored.
pub type KeyPartials = (String, Vec<Json>);

impl Store {
    /// A snapshot of `generation` for reads.
    pub fn read_view(&self, generation: &Generation) -> Result<ReadView<'_>, StoreError> {
        Ok(ReadView {
            cf: self.cf(generation)?,
            snapshot: self.db.snapshot(),
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
            if let (Some(topic), Some(partition), Some(next)) = (topic, partition, decode_u64(&value)) {
                let topic = String::from_utf8_lossy(&topic).into_owned();
                offsets.insert(
                    SourcePartition {
                        topic: topic.into(),
                        partition,
                    },
                    next as i64,
                );
            }
        }
        Ok(offsets)
    }

    /// The partial states of `key`.
    pub fn partials(&self, key: &str) -> Result<Vec<Json>, StoreError> {
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
            partials.push(serde_json::from_slice(&value).map_err(failed(format!("decoding `{key}`")))?);
        }
        Ok(partials)
    }

    /// Keys starting with `prefix`, in key order, strictly after `after` when given;
    /// at most `limit` keys, each with its partials. `accept` filters keys (hidden
    /// bookkeeping keys do not count toward the limit).
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        accept: &mut dyn FnMut(&str, &[Json]) -> bool,
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
            let partial: Json =
                serde_json::from_slice(&value).map_err(failed(format!("decoding `{key}`")))?;
            match &mut current {
                Some((k, partials)) if *k == key => partials.push(partial),
                _ => {
                    if let Some((k, partials)) = current.take() {
                        if accept(&k, &partials) {
                            found.push((k, partials));
                            if found.len() == limit {
                                return Ok(found);
                            }
                        }
                    }
                    current = Some((key, vec![partial]));
                }
            }
        }
        if let Some((k, partials)) = current {
            if found.len() < limit && accept(&k, &partials) {
                found.push((k, partials));
            }
        }
        Ok(found)
    }
}

/// Options of a generation's column family. The fold reads every key it has not
/// cached in the batch; most reads of a first run or a replay miss (a new key),
/// so bloom filters, in the memtable and in the table files, answer those without
/// searching.
fn generation_options() -> Options {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    let mut options = Options::default();
    options.set_block_based_table_factory(&table);
    options.set_memtable_whole_key_filtering(true);
    options.set_memtable_prefix_bloom_ratio(0.1);
    options.set_write_buffer_size(16 * 1024 * 1024);
    options
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    for &byte in bytes {
        out.push(byte);
        if byte == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

/// Reads one escaped component from the front of `rest`.
fn unescape_next(rest: &mut &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == 0 {
            match rest.get(i + 1)? {
                0 => {
                    *rest = &rest[i + 2..];
                    return Some(out);
                }
                0xFF => {
                    out.push(0);
                    i += 2;
                    continue;
                }
                _ => return None,
            }
        }
        out.push(rest[i]);
        i += 1;
    }
    None
}

fn state_prefix(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 3);
    out.push(b's');
    push_escaped(&mut out, key.as_bytes());
    out
}

fn state_key(key: &str, partition: &SourcePartition) -> Vec<u8> {
    let mut out = state_prefix(key);
    push_escaped(&mut out, partition.topic.as_bytes());
    out.extend_from_slice(&partition.partition.to_be_bytes());
    out
}

fn offset_key(partition: &SourcePartition) -> Vec<u8> {
    let mut out = vec![b'o'];
    push_escaped(&mut out, partition.topic.as_bytes());
    out.extend_from_slice(&partition.partition.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn partition(topic: &str, partition: i32) -> SourcePartition {
        SourcePartition {
            topic: topic.into(),
            partition,
        }
    }

    #[test]
    fn state_and_offsets_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), false).unwrap();
            let generation = store.live_generation("p").unwrap();
            let mut batch = BatchWrite::default();
            batch
                .rows
                .push(("a".into(), partition("t", 0), Some(json!({"n": 1}))));
            batch
                .rows
                .push(("a".into(), partition("t", 3), Some(json!({"n": 2}))));
            batch
                .rows
                .push(("ab".into(), partition("t", 0), Some(json!({"n": 9}))));
            batch.offsets.insert(partition("t", 0), 17);
            batch.offsets.insert(partition("t", 3), 4);
            store.commit(&generation, &batch).unwrap();
        }
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        assert_eq!(generation.number, 1);
        assert_eq!(
            store.read_view(&generation).unwrap().partials("a").unwrap(),
            vec![json!({"n": 1}), json!({"n": 2})],
            "the partials of `a` and only those"
        );
        assert_eq!(
            store.next_offset(&generation, &partition("t", 0)).unwrap(),
            Some(17)
        );
        assert_eq!(store.next_offset(&generation, &partition("t", 1)).unwrap(), None);
        let offsets = store.offsets(&generation).unwrap();
        assert_eq!(offsets.len(), 2);
        assert_eq!(offsets[&partition("t", 3)], 4);
    }

    #[test]
    fn scans_group_partials_by_key_in_order_with_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        let mut batch = BatchWrite::default();
        for key in ["b1", "a", "b2", "b3", "c"] {
            batch.rows.push((key.into(), partition("t", 0), Some(json!(key))));
            batch.rows.push((key.into(), partition("t", 1), Some(json!(1))));
        }
        batch.offsets.insert(partition("t", 0), 9);
        store.commit(&generation, &batch).unwrap();
        let view = store.read_view(&generation).unwrap();
        let keys = |prefix: &str, after: Option<&str>, limit: usize| -> Vec<String> {
            view.scan(prefix, after, limit, &mut |_, _| true)
                .unwrap()
                .into_iter()
                .map(|(k, partials)| {
                    assert_eq!(partials.len(), 2, "every partial of {k}");
                    k
                })
                .collect()
        };
        assert_eq!(keys("b", None, 10), ["b1", "b2", "b3"]);
        assert_eq!(keys("b", None, 2), ["b1", "b2"]);
        assert_eq!(keys("b", Some("b2"), 10), ["b3"]);
        assert_eq!(keys("", Some("b3"), 10), ["c"]);
        assert_eq!(keys("", None, 100).len(), 5);
        let hidden = view.scan("", None, 2, &mut |k, _| k != "a").unwrap();
        assert_eq!(
            hidden.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["b1", "b2"]
        );
        assert_eq!(view.offsets().unwrap()[&partition("t", 0)], 9);
    }

    #[test]
    fn reset_drops_every_generation_and_the_live_pointer() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), false).unwrap();
            let generation = store.live_generation("p").unwrap();
            let other = store.live_generation("p2").unwrap();
            let mut batch = BatchWrite::default();
            batch.rows.push(("k".into(), partition("t", 0), Some(json!(1))));
            batch.offsets.insert(partition("t", 0), 5);
            store.commit(&generation, &batch).unwrap();
            store.commit(&other, &batch).unwrap();
        }
        let store = Store::open(dir.path(), false).unwrap();
        assert_eq!(store.reset("p").unwrap(), ["p@1"]);
        assert!(store.reset("p").unwrap().is_empty(), "nothing left to drop");
        let generation = store.live_generation("p").unwrap();
        assert!(store.offsets(&generation).unwrap().is_empty(), "p starts over");
        let other = store.live_generation("p2").unwrap();
        assert_eq!(store.offsets(&other).unwrap().len(), 1, "p2 is untouched");
    }

    #[test]
    fn a_replay_switches_in_one_write_and_orphans_are_dropped_on_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let definition = json!({"kind": "k"});
        {
            let store = Store::open(dir.path(), false).unwrap();
            let live = store.live_generation("p").unwrap();
            let replay = store.begin_replay("p", &definition).unwrap();
            assert_eq!((live.number, replay.number), (1, 2));
            assert_eq!(store.replay_generation("p").unwrap(), Some(replay.clone()));
            assert_eq!(store.definition(&replay).unwrap(), Some(definition.clone()));
            store.switch_live(&replay).unwrap();
            assert_eq!(store.live_generation("p").unwrap(), replay);
            assert_eq!(store.replay_generation("p").unwrap(), None);
            // Killed before dropping generation 1; and an aborted replay's mark
            // cleared before its generation was dropped.
            let aborted = store.begin_replay("p", &definition).unwrap();
            assert_eq!(aborted.number, 3);
            store.end_replay("p").unwrap();
        }
        let store = Store::open(dir.path(), false).unwrap();
        assert_eq!(store.generation_numbers("p"), [1, 2, 3]);
        assert_eq!(store.drop_orphans("p").unwrap(), ["p@1", "p@3"]);
        assert_eq!(store.generation_numbers("p"), [2]);
        let next = store.begin_replay("p", &definition).unwrap();
        assert_eq!(
            next.number, 3,
            "numbers above the live one are reused once dropped"
        );
        assert!(
            store.offsets(&next).unwrap().is_empty(),
            "a new generation starts empty"
        );
    }

    #[test]
    fn delete_removes_a_partial() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        let mut batch = BatchWrite::default();
        batch.rows.push(("k".into(), partition("t", 0), Some(json!(1))));
        store.commit(&generation, &batch).unwrap();
        let mut batch = BatchWrite::default();
        batch.rows.push(("k".into(), partition("t", 0), None));
        store.commit(&generation, &batch).unwrap();
        assert!(store
            .read_view(&generation)
            .unwrap()
            .partials("k")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn keys_with_nul_bytes_do_not_collide_with_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        let mut batch = BatchWrite::default();
        batch
            .rows
            .push(("a\0".into(), partition("t", 0), Some(json!("nul"))));
        batch
            .rows
            .push(("a".into(), partition("t", 0), Some(json!("plain"))));
        store.commit(&generation, &batch).unwrap();
        assert_eq!(
            store.read_view(&generation).unwrap().partials("a").unwrap(),
            vec![json!("plain")]
        );
        assert_eq!(
            store.read_view(&generation).unwrap().partials("a\0").unwrap(),
            vec![json!("nul")]
        );
    }
}
