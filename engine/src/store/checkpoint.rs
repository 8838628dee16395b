//! Checkpoints: a consistent copy of the whole store, to seed another store
//! without refolding the log.
//!
//! RocksDB's checkpoint is a point-in-time copy (hard links where it can) of
//! every column family, so each generation's state and offsets in it are those
//! of one committed batch (DESIGN.md invariant 1 carries over). A checkpoint is a
//! directory: `db/` (the RocksDB copy) and `projector-checkpoint.json` (its format
//! version and, per projection, the live generation, its offsets and definition).
//! A worker started on a store restored from it continues from those offsets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{Store, StoreError};

/// The checkpoint format this build writes and reads.
pub const CHECKPOINT_FORMAT: u32 = 1;

const MANIFEST: &str = "projector-checkpoint.json";
const DB_DIR: &str = "db";

/// What a checkpoint holds, as recorded beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`CHECKPOINT_FORMAT`] of the build that wrote it.
    pub format: u32,
    /// Milliseconds since the epoch when it was taken.
    pub taken_at_ms: u64,
    /// Every projection in the store.
    pub projections: Vec<CheckpointedProjection>,
}

/// One projection's live generation in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointedProjection {
    /// Projection name.
    pub name: String,
    /// Its live generation.
    pub generation: u64,
    /// The next offset of each source partition (`"orders/0": 1234`).
    pub offsets: BTreeMap<String, i64>,
    /// The definition the generation folds with.
    pub definition: Option<Json>,
}

/// A checkpoint that could not be taken or restored: what and where.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The target directory is there and not empty.
    #[error("{0} is not empty: a checkpoint or restore goes into a new or empty directory")]
    NotEmpty(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// RocksDB failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The manifest is missing or unreadable.
    #[error("{path} is not a Projector checkpoint manifest: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint was written in a format this build does not read.
    #[error(
        "{path} is checkpoint format {found}; this build reads format {CHECKPOINT_FORMAT}: restore it \
         with the version that wrote it, or rebuild the store from the log"
    )]
    Format {
        /// The manifest file.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Refuses a directory that exists with something in it.
fn ensure_empty(dir: &Path) -> Result<(), CheckpointError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            Some(_) => Err(CheckpointError::NotEmpty(dir.to_owned())),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
    }
}

impl Store {
    /// Writes a checkpoint of the whole store into `dir` (new or empty) and
    /// returns its manifest.
    pub fn checkpoint(&self, dir: &Path) -> Result<Manifest, CheckpointError> {
        ensure_empty(dir)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let db_dir = dir.join(DB_DIR);
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|checkpoint| checkpoint.create_checkpoint(&db_dir))
            .map_err(super::failed(format!(
                "writing a checkpoint to {}",
                db_dir.display()
            )))?;
        // The manifest describes the copy, not the store, which moves on.
        let manifest = Store::open(&db_dir, false)?.manifest()?;
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| CheckpointError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let temporary = dir.join(format!("{MANIFEST}.tmp"));
        std::fs::write(&temporary, text).map_err(io(&temporary))?;
        std::fs::rename(&temporary, &path).map_err(io(&path))?;
        Ok(manifest)
    }

    fn manifest(&self) -> Result<Manifest, StoreError> {
        let mut names: Vec<String> = self
            .column_families
            .lock()
            .expect("cf list lock")
            .iter()
            .filter_map(|cf| cf.rsplit_once('@').map(|(name, _)| name.to_owned()))
            .collect();
        names.sort();
        names.dedup();
        let mut projections = Vec::with_capacity(names.len());
        for name in names {
            let generation = self.live_generation(&name)?;
            let offsets = self
                .offsets(&generation)?
                .into_iter()
                .map(|(partition, next)| (partition.to_string(), next))
                .collect();
            projections.push(CheckpointedProjection {
                definition: self.definition(&generation)?,
                name,
                generation: generation.number,
                offsets,
            });
        }
        let taken_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Ok(Manifest {
            format: CHECKPOINT_FORMAT,
            taken_at_ms,
            projections,
        })
    }
}

/// The manifest of the checkpoint in `dir`, refusing a format this build does not
/// read.
pub fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let value: Json = serde_json::from_str(&text).map_err(|e| CheckpointError::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let found = value
        .get("format")
        .and_then(Json::as_u64)
        .and_then(|f| u32::try_from(f).ok())
        .ok_or_else(|| CheckpointError::Manifest {
            path: path.clone(),
            message: "no format version".to_owned(),
        })?;
    if found != CHECKPOINT_FORMAT {
        return Err(CheckpointError::Format { path, found });
    }
    serde_json::from_value(value).map_err(|e| CheckpointError::Manifest {
        path,
        message: e.to_string(),
    })
}

/// Seeds the store at `to` (new or empty) from the checkpoint in `from`, then
/// opens it to check that it holds what the manifest says.
pub fn restore(from: &Path, to: &Path) -> Result<Manifest, CheckpointError> {
    let manifest = read_manifest(from)?;
    ensure_empty(to)?;
    std::fs::create_dir_all(to).map_err(io(to))?;
    let db_dir = from.join(DB_DIR);
    for entry in std::fs::read_dir(&db_dir).map_err(io(&db_dir))? {
        let entry = entry.map_err(io(&db_dir))?;
        let source = entry.path();
        if source.is_file() {
            std::fs::copy(&source, to.join(entry.file_name())).map_err(io(&source))?;
        }
    }
    let restored = Store::open(to, false)?.manifest()?;
    if restored.projections != manifest.projections {
        return Err(CheckpointError::Manifest {
            path: from.join(MANIFEST),
            message: format!(
                "the restored store at {} does not hold what the manifest lists",
                to.display()
            ),
        });
    }
    Ok(manifest)
}
