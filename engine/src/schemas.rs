//! Reader schemas: the current version of every event type, read from `schemas/`.
//!
//! Layout: `<dir>/<namespace>/<Name>.v<N>.avsc`. The highest `N` of a type is the
//! version projections see.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use apache_avro::Schema;

/// A schema set that could not be loaded; names the file.
#[derive(Debug, thiserror::Error)]
#[error("schemas {path}: {message}")]
pub struct SchemaSetError {
    /// The file or directory at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// One version of one event type.
#[derive(Debug, Clone)]
pub struct SchemaVersion {
    /// Version number from the file name.
    pub version: u32,
    /// The parsed schema.
    pub schema: Schema,
    /// The file it came from.
    pub path: PathBuf,
}

/// Every event type's reader schema, by full name.
#[derive(Debug, Default)]
pub struct ReaderSchemas {
    current: HashMap<String, SchemaVersion>,
}

impl ReaderSchemas {
    /// Loads every `.avsc` under `dir`.
    pub fn load(dir: &Path) -> Result<ReaderSchemas, SchemaSetError> {
        let error = |path: &Path, message: String| SchemaSetError {
            path: path.to_owned(),
            message,
        };
        let mut files = Vec::new();
        collect_avsc(dir, &mut files).map_err(|e| error(dir, e.to_string()))?;
        let mut current: HashMap<String, SchemaVersion> = HashMap::new();
        for path in files {
            let version = version_from_file_name(&path)
                .ok_or_else(|| error(&path, "file name must be `<Name>.v<N>.avsc`".to_owned()))?;
            let text = std::fs::read_to_string(&path).map_err(|e| error(&path, e.to_string()))?;
            let schema = Schema::parse_str(&text).map_err(|e| error(&path, e.to_string()))?;
            let name = match &schema {
                Schema::Record(record) => record.name.fullname(None),
                _ => return Err(error(&path, "an event schema must be a record".to_owned())),
            };
            let candidate = SchemaVersion {
                version,
                schema,
                path: path.clone(),
            };
            match current.get(&name) {
                Some(existing) if existing.version == version => {
                    return Err(error(
                        &path,
                        format!(
                            "{name} v{version} is also defined in {}",
                            existing.path.display()
                        ),
                    ))
                }
                Some(existing) if existing.version > version => {}
                _ => {
                    current.insert(name, candidate);
                }
            }
        }
        Ok(ReaderSchemas { current })
    }

    /// The current version of `full_name`, if the schema set knows the type.
    pub fn current(&self, full_name: &str) -> Option<&SchemaVersion> {
        self.current.get(full_name)
    }

    /// How many event types are known.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// True when no event type is known.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

fn collect_avsc(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            collect_avsc(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "avsc") {
            out.push(path);
        }
    }
    Ok(())
}

fn version_from_file_name(path: &Path) -> Option<u32> {
    let stem = path.file_stem()?.to_str()?;
    let (_, version) = stem.rsplit_once(".v")?;
    version.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_repository_schemas_and_picks_the_newest_version() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        let schemas = ReaderSchemas::load(&dir).unwrap();
        let placed = schemas.current("shop.orders.OrderPlaced").unwrap();
        assert!(placed.version >= 2);
        assert!(schemas.current("shop.orders.OrderShipped").is_some());
    }

    #[test]
    fn a_file_without_version_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Thing.avsc"), "{}").unwrap();
        let error = ReaderSchemas::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("Thing.avsc"), "{error}");
    }
}
