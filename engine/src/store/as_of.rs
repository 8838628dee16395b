//! The catalogue of as-of generations: frozen generations of a projection that
//! fold only the events up to a time (`until`), reading each partition up to the
//! high watermark seen when they were requested. One row per generation in the
//! default column family, `asof/<projection>/<until ms>` → [`AsOfRecord`] as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{failed, Generation, Store, StoreError};

const AS_OF_PREFIX: &str = "asof/";

/// What the store remembers of an as-of generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsOfRecord {
    /// Its generation number (its column family is `<projection>@<n>`).
    pub generation: u64,
    /// The time it folds up to, inclusive, in ms since the epoch.
    pub until_ms: i64,
    /// Per source partition (`topic/partition`), the (low, high) watermarks when
    /// it was requested: it reads up to `high`.
    pub targets: BTreeMap<String, (i64, i64)>,
    /// True once every partition reached its target: the state is final.
    pub complete: bool,
    /// When it was requested, in seconds since the epoch.
    pub requested_at: u64,
}

fn record_key(projection: &str, until_ms: i64) -> String {
    // Zero-padded and offset so the keys sort by time, earliest first.
    format!(
        "{AS_OF_PREFIX}{projection}/{:020}",
        (until_ms as i128 - i64::MIN as i128)
    )
}

impl Store {
    /// The as-of generations of `projection`, earliest `until` first.
    pub fn as_of_records(&self, projection: &str) -> Result<Vec<AsOfRecord>, StoreError> {
        let prefix = format!("{AS_OF_PREFIX}{projection}/");
        let mut records = Vec::new();
        let rows = self.db.iterator(rocksdb::IteratorMode::From(
            prefix.as_bytes(),
            rocksdb::Direction::Forward,
        ));
        for item in rows {
            let (key, value) =
                item.map_err(failed(format!("reading the as-of generations of {projection}")))?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            let record: AsOfRecord = serde_json::from_slice(&value).map_err(failed(format!(
                "the as-of record {} is unreadable",
                String::from_utf8_lossy(&key)
            )))?;
            records.push(record);
        }
        Ok(records)
    }

    /// Creates an as-of generation of `projection` (one above every existing
    /// generation) with the definition it folds with, and records it.
    pub fn begin_as_of(
        &self,
        projection: &str,
        definition: &Json,
        until_ms: i64,
        targets: BTreeMap<String, (i64, i64)>,
        requested_at: u64,
    ) -> Result<(Generation, AsOfRecord), StoreError> {
        let generation = self.next_generation(projection)?;
        self.record_definition(&generation, definition)?;
        let record = AsOfRecord {
            generation: generation.number,
            until_ms,
            targets,
            complete: false,
            requested_at,
        };
        self.put_as_of(projection, &record)?;
        Ok((generation, record))
    }

    /// Records that an as-of generation reached every target.
    pub fn complete_as_of(&self, projection: &str, until_ms: i64) -> Result<(), StoreError> {
        let Some(mut record) = self
            .as_of_records(projection)?
            .into_iter()
            .find(|r| r.until_ms == until_ms)
        else {
            return Ok(());
        };
        record.complete = true;
        self.put_as_of(projection, &record)
    }

    /// Forgets an as-of generation's record (its column family is dropped by the
    /// caller, or at the next start as an orphan).
    pub fn forget_as_of(&self, projection: &str, until_ms: i64) -> Result<(), StoreError> {
        self.db
            .delete(record_key(projection, until_ms))
            .map_err(failed(format!("forgetting an as-of generation of {projection}")))
    }

    fn put_as_of(&self, projection: &str, record: &AsOfRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(failed("encoding an as-of record"))?;
        self.db
            .put_opt(
                record_key(projection, record.until_ms),
                bytes,
                &self.write_options,
            )
            .map_err(failed(format!("recording an as-of generation of {projection}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sort_by_time_and_survive_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let definition = serde_json::json!({"kind": "k"});
        let targets: BTreeMap<String, (i64, i64)> = [("orders/0".to_owned(), (0, 10))].into();
        let (late, _) = store
            .begin_as_of("p", &definition, 2_000, targets.clone(), 1)
            .unwrap();
        let (early, _) = store
            .begin_as_of("p", &definition, -5, targets.clone(), 1)
            .unwrap();
        assert_eq!((late.number, early.number), (2, 3), "above the live generation 1");
        store.complete_as_of("p", 2_000).unwrap();
        let records = store.as_of_records("p").unwrap();
        let times: Vec<(i64, bool)> = records.iter().map(|r| (r.until_ms, r.complete)).collect();
        assert_eq!(times, vec![(-5, false), (2_000, true)]);
        assert_eq!(store.definition(&late).unwrap(), Some(definition));
        assert!(store.as_of_records("p2").unwrap().is_empty());
        store.forget_as_of("p", -5).unwrap();
        assert_eq!(store.as_of_records("p").unwrap().len(), 1);
        // Orphan clean-up keeps generations that an as-of record names.
        assert!(store.drop_orphans("p").unwrap() == vec!["p@3".to_owned()]);
    }
}
