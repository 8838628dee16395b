//! The catalogue of generations: which generation of each projection is live,
//! which one a replay is building, the definition each folds with, and their
//! column families. A replay's switch is one write of the first two.

use std::sync::Arc;

use rocksdb::{BoundColumnFamily, WriteBatch};
use serde_json::Value as Json;

use super::keys::{decode_u64, generation_options};
use super::{failed, Generation, Store, StoreError};

const LIVE_PREFIX: &[u8] = b"live/";
const REPLAY_PREFIX: &[u8] = b"replay/";
const DEFINITION_PREFIX: &[u8] = b"definition/";

fn pointer_key(prefix: &[u8], projection: &str) -> Vec<u8> {
    [prefix, projection.as_bytes()].concat()
}

impl Store {
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
    /// forgets which was live, replaying or as of a time, so its next run rebuilds it from
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
        for record in self.as_of_records(projection)? {
            self.forget_as_of(projection, record.until_ms)?;
        }
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
    /// replayed nor as of a time (left by a crash between a switch, an abort or
    /// an as-of's removal and the drop). Returns the column families dropped.
    pub fn drop_orphans(&self, projection: &str) -> Result<Vec<String>, StoreError> {
        let live = self.pointer(LIVE_PREFIX, projection)?;
        let replay = self.pointer(REPLAY_PREFIX, projection)?;
        let as_of: Vec<u64> = self
            .as_of_records(projection)?
            .iter()
            .map(|r| r.generation)
            .collect();
        let mut dropped = Vec::new();
        for number in self.generation_numbers(projection) {
            if Some(number) != live && Some(number) != replay && !as_of.contains(&number) {
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
        let generation = self.next_generation(projection)?;
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

    /// [`Store::begin_replay`] into generation `number`, which every worker of a
    /// deployment builds (the replay record in the cluster topic names it). A
    /// leftover of that number (an earlier attempt aborted) is dropped first.
    pub fn begin_replay_at(
        &self,
        projection: &str,
        definition: &Json,
        number: u64,
    ) -> Result<Generation, StoreError> {
        let live = self.live_generation(projection)?;
        let generation = Generation {
            projection: projection.to_owned(),
            number,
        };
        if number <= live.number {
            return Err(StoreError {
                context: format!("replaying `{projection}` into generation {number}"),
                source: format!("generation {} is live already", live.number).into(),
            });
        }
        if self.replay_generation(projection)?.map(|g| g.number) != Some(number) {
            self.drop_generation(&generation)?;
        }
        self.ensure_column_family(&generation)?;
        self.record_definition(&generation, definition)?;
        self.db
            .put(pointer_key(REPLAY_PREFIX, projection), number.to_be_bytes())
            .map_err(failed(format!(
                "marking {} as replaying",
                generation.column_family()
            )))?;
        Ok(generation)
    }

    /// Creates the column family of a new generation, one above every existing one.
    pub(super) fn next_generation(&self, projection: &str) -> Result<Generation, StoreError> {
        let live = self.live_generation(projection)?;
        let highest = self.generation_numbers(projection).last().copied().unwrap_or(0);
        let generation = Generation {
            projection: projection.to_owned(),
            number: highest.max(live.number) + 1,
        };
        self.ensure_column_family(&generation)?;
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

    pub(super) fn cf(&self, generation: &Generation) -> Result<Arc<BoundColumnFamily<'_>>, StoreError> {
        let name = generation.column_family();
        self.db.cf_handle(&name).ok_or_else(|| StoreError {
            context: format!("column family {name}"),
            source: "missing".into(),
        })
    }
}
