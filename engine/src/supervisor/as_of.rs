//! A projection's as-of generations (see [`crate::as_of`]): requesting one,
//! finding one by its time, removing one, and the end of an as-of loop.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::{unix_seconds, Supervisor};
use crate::as_of::AsOfSpec;
use crate::fold_state::{Command, Fold};
use crate::store::{Store, StoreError};

/// Why an as-of generation could not be requested.
#[derive(Debug, thiserror::Error)]
pub enum AsOfError {
    /// One with that time exists already.
    #[error("an as-of generation until {0} exists already")]
    Exists(String),
    /// The store could not create it.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Supervisor {
    /// Starts an as-of generation folding up to `until_ms` with the configured
    /// definition, reading each partition up to its target's high watermark.
    pub fn request_as_of(
        &self,
        store: &Store,
        until_ms: i64,
        targets: BTreeMap<String, (i64, i64)>,
    ) -> Result<Arc<Fold>, AsOfError> {
        let mut as_ofs = self.as_ofs.lock().expect("as-of lock");
        if let Some(existing) = as_ofs.get(&until_ms) {
            let until = existing
                .as_of
                .as_ref()
                .map(AsOfSpec::until_text)
                .unwrap_or_default();
            return Err(AsOfError::Exists(until));
        }
        let (generation, record) = store.begin_as_of(
            &self.name,
            &self.configured_definition,
            until_ms,
            targets,
            unix_seconds(),
        )?;
        let topics = crate::config::definition_topics(&self.configured_definition);
        let fold = Fold::new(generation, self.configured_projection.clone(), topics, false)
            .with_as_of(AsOfSpec::from_record(&record));
        let fold = Arc::new(fold);
        as_ofs.insert(until_ms, fold.clone());
        drop(as_ofs);
        info!(projection = %self.name, generation = fold.generation.number,
            until = %crate::as_of::format_instant(until_ms), "as-of generation started");
        self.spawn(fold.clone());
        Ok(fold)
    }

    /// Adds an as-of generation found in the store (started by [`Supervisor::start`]
    /// unless complete).
    pub fn restore_as_of(&self, fold: Fold) {
        if let Some(until) = fold.as_of.as_ref().map(|spec| spec.until_ms) {
            self.as_ofs
                .lock()
                .expect("as-of lock")
                .insert(until, Arc::new(fold));
        }
    }

    /// The as-of generations, earliest time first.
    pub fn as_of_folds(&self) -> Vec<Arc<Fold>> {
        self.as_ofs
            .lock()
            .expect("as-of lock")
            .values()
            .cloned()
            .collect()
    }

    /// The as-of generation folding up to `until_ms`.
    pub fn as_of_at(&self, until_ms: i64) -> Option<Arc<Fold>> {
        self.as_ofs.lock().expect("as-of lock").get(&until_ms).cloned()
    }

    /// Removes the as-of generation of `until_ms`: forgotten at once, its column
    /// family dropped now or, while its loop runs, once the loop has stopped.
    /// False when there is none.
    pub fn remove_as_of(&self, store: &Store, until_ms: i64) -> Result<bool, StoreError> {
        let mut as_ofs = self.as_ofs.lock().expect("as-of lock");
        let Some(fold) = as_ofs.remove(&until_ms) else {
            return Ok(false);
        };
        store.forget_as_of(&self.name, until_ms)?;
        if fold.loop_running() {
            fold.tell(Command::Stop);
        } else {
            store.drop_generation(&fold.generation)?;
        }
        info!(projection = %self.name, generation = fold.generation.number, "as-of generation removed");
        Ok(true)
    }

    /// Starts the loops of as-of generations that are not complete.
    pub(super) fn start_as_ofs(&self) {
        for fold in self.as_of_folds() {
            if fold.as_of.as_ref().is_some_and(|spec| !spec.is_complete()) {
                self.spawn(fold);
            }
        }
    }

    /// An as-of generation's loop ended: if the generation was removed meanwhile,
    /// its column family is dropped now.
    pub(super) fn as_of_loop_exited(&self, fold: &Arc<Fold>, store: &Store) {
        let as_ofs = self.as_ofs.lock().expect("as-of lock");
        let kept = as_ofs.values().any(|f| Arc::ptr_eq(f, fold));
        if !kept {
            if let Err(e) = store.drop_generation(&fold.generation) {
                warn!(error = %e, "dropping a removed as-of generation; it is dropped at the next start");
            }
        }
    }
}
