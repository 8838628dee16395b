//! A generation's rows as the fold loop uses them: a key's partial state and a
//! partition's next offset, read one at a time, and a batch of both written in
//! one `WriteBatch` (DESIGN.md invariant 1).

use std::collections::BTreeMap;

use super::keys::{decode_offset, offset_key, state_key};
use super::seen_ids::{seen_key, seen_value};
use super::{failed, BatchWrite, Generation, SourcePartition, Store, StoreError};
use rocksdb::WriteBatch;

impl Store {
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
        bytes
            .map(|b| decode_offset(generation, partition, &b))
            .transpose()
    }

    /// Every committed offset of a generation.
    pub fn offsets(&self, generation: &Generation) -> Result<BTreeMap<SourcePartition, i64>, StoreError> {
        self.read_view(generation)?.offsets()
    }

    /// The partial state of `key` from one source partition, decoded by `decode`
    /// straight from RocksDB's block or memtable; a row `decode` refuses is a
    /// store error naming it.
    pub fn partial<T, E>(
        &self,
        generation: &Generation,
        key: &str,
        partition: &SourcePartition,
        decode: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<Option<T>, StoreError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let cf = self.cf(generation)?;
        // (Error contexts are formatted only on error: this runs for every miss.)
        let bytes = self
            .db
            .get_pinned_cf(&cf, state_key(key, partition))
            .map_err(|e| failed(format!("reading `{key}` of {partition}"))(e))?;
        bytes
            .map(|b| {
                decode(&b).map_err(|e| {
                    failed(format!(
                        "the state row of `{key}` from {partition} in column family {} is unreadable",
                        generation.column_family()
                    ))(e)
                })
            })
            .transpose()
    }

    /// Writes one batch atomically: state rows, offsets and event ids together.
    pub fn commit(&self, generation: &Generation, batch: &BatchWrite) -> Result<(), StoreError> {
        self.commit_many(&[(generation, batch)])
    }

    /// Writes the batches of several generations (the projections of a shared
    /// source) in one atomic write: each generation's rows, offsets and ids in its
    /// own column family.
    pub fn commit_many(&self, batches: &[(&Generation, &BatchWrite)]) -> Result<(), StoreError> {
        let mut write = WriteBatch::default();
        for (generation, batch) in batches {
            self.add_to(&mut write, generation, batch)?;
        }
        let what = match batches {
            [(generation, _)] => generation.projection.clone(),
            _ => format!("{} projections", batches.len()),
        };
        self.db
            .write_opt(write, &self.write_options)
            .map_err(failed(format!("committing a batch of {what}")))
    }

    fn add_to(
        &self,
        write: &mut WriteBatch,
        generation: &Generation,
        batch: &BatchWrite,
    ) -> Result<(), StoreError> {
        let cf = self.cf(generation)?;
        let mut rows: Vec<(Vec<u8>, &Option<Vec<u8>>)> = batch
            .rows
            .iter()
            .map(|(key, partition, state)| (state_key(key, partition), state))
            .collect();
        // In key order, each memtable insert starts its search where the last one
        // ended instead of at the top of the skip list.
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (row, state) in rows {
            match state {
                Some(state) => write.put_cf(&cf, row, state),
                None => write.delete_cf(&cf, row),
            }
        }
        for (partition, next) in &batch.offsets {
            write.put_cf(&cf, offset_key(partition), (*next as u64).to_be_bytes());
        }
        // Puts before deletes: an id remembered and forgotten within one batch
        // leaves no row.
        for (partition, seen) in &batch.seen {
            write.put_cf(&cf, seen_key(partition, seen.offset), seen_value(seen));
        }
        for (partition, offset) in &batch.forgotten {
            write.delete_cf(&cf, seen_key(partition, *offset));
        }
        Ok(())
    }
}
