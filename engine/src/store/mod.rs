//! Projection state in RocksDB.
//!
//! Each generation of a projection has its own column family `<projection>@<n>`
//! holding its state rows and its offsets ([`keys`] says how they are laid out;
//! [`rows`] reads and writes them for the fold loop; [`read`] serves consistent
//! reads). The default column family holds, per projection ([`catalog`]), which
//! generation is live (`live/<projection>`), which one a replay is building
//! (`replay/<projection>`), and the definition each generation folds with
//! (`definition/<projection>@<n>`). A replay's switch is one write of the first
//! two (DESIGN.md invariant 3).
//!
//! A batch's state rows, offsets and event ids ([`seen_ids`]) go in one
//! `WriteBatch` (DESIGN.md invariant 1).

mod as_of;
mod catalog;
mod checkpoint;
mod keys;
mod read;
mod rows;
mod seen_ids;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use keys::generation_options;
use rocksdb::{DBWithThreadMode, MultiThreaded, Options, WriteOptions};

pub use as_of::AsOfRecord;
pub use read::{KeyPartials, ReadView};
pub use seen_ids::{SeenId, ID_DIGEST_BYTES};

pub use checkpoint::{
    read_manifest, restore, CheckpointError, CheckpointedProjection, Manifest, CHECKPOINT_FORMAT,
};

type Db = DBWithThreadMode<MultiThreaded>;

/// A RocksDB failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("store: {context}: {source}")]
pub struct StoreError {
    pub(crate) context: String,
    #[source]
    pub(crate) source: Box<dyn std::error::Error + Send + Sync>,
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

pub(crate) fn failed<E: std::error::Error + Send + Sync + 'static>(
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
    /// Partial state rows by (key, source partition), as the projection encoded
    /// them.
    pub rows: Vec<(String, SourcePartition, Option<Vec<u8>>)>,
    /// Next offset to apply, per partition.
    pub offsets: BTreeMap<SourcePartition, i64>,
    /// Event ids folded by this batch, to remember ([`SeenId`]).
    pub seen: Vec<(SourcePartition, SeenId)>,
    /// Remembered ids to forget (out of the window), by partition and offset.
    pub forgotten: Vec<(SourcePartition, i64)>,
}

/// The RocksDB database of one worker.
pub struct Store {
    db: Db,
    write_options: WriteOptions,
    /// Names of the column families, which RocksDB does not list on an open handle.
    column_families: std::sync::Mutex<Vec<String>>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, sync_writes: bool) -> Result<Store, StoreError> {
        Self::open_with_max_files(path, sync_writes, 256)
    }

    /// [`Store::open`], keeping at most `max_open_files` files open (RocksDB's
    /// `max_open_files`: part of the worker's descriptor budget).
    pub fn open_with_max_files(
        path: &Path,
        sync_writes: bool,
        max_open_files: u32,
    ) -> Result<Store, StoreError> {
        let mut options = Options::default();
        options.set_max_open_files(i32::try_from(max_open_files).unwrap_or(i32::MAX));
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
}
