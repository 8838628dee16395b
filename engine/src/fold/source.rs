//! Shared sources: the live generations of the projections that read the same
//! topics are folded by one loop, from one consumer (group
//! `<prefix>.source.<topics>`) and one decoding thread, so a topic is fetched,
//! decoded and upcast once for all of them. Each decoded event is folded into
//! every member that has not applied it yet, and one RocksDB write commits every
//! member's rows and its own offsets (invariant 1 holds per projection).
//!
//! Joining and leaving. A fold that is behind (a new projection, a generation a
//! replay just switched in, one resumed after a poison event) folds on a
//! consumer of its own first. Once the partitions it folds are those of the
//! source and its offsets are within [`JOIN_DISTANCE`] events of the source's,
//! it commits, ends its loop and asks to join; the source adopts it between
//! chunks (with everything polled folded) and, where the newcomer is behind,
//! seeks back to its offset: the other members pass over what they applied
//! already, so nothing is folded twice or skipped. A member stopped by a poison
//! event (or told to stop by a handover) commits and leaves without holding the
//! others back; a member whose fold panicked leaves and folds again on its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::fold_state::Fold;
use crate::store::SourcePartition;
use crate::supervisor::Supervisor;

/// How far a fold may be from the shared source, in events summed over its
/// partitions, to join it: what the source's other members read again (and pass
/// over) when the newcomer is behind.
pub const JOIN_DISTANCE: i64 = 10_000;

/// Starts a shared source's loop for the given folds (set once by the worker).
pub type SourceStarter = Box<dyn Fn(Arc<SharedSource>, Vec<(Arc<Supervisor>, Arc<Fold>)>) + Send + Sync>;

/// The shared source of one set of topics.
pub struct SharedSource {
    /// Its topics, sorted.
    pub topics: Vec<String>,
    /// How many projections read these topics (each member's share of the state
    /// cache is the configured size divided by it).
    members_configured: usize,
    state: Mutex<SourceState>,
    /// Set while folds wait to be adopted (checked by the loop between chunks).
    joining: AtomicBool,
    starter: OnceLock<SourceStarter>,
}

#[derive(Default)]
struct SourceState {
    running: bool,
    joining: Vec<(Arc<Supervisor>, Arc<Fold>)>,
    /// The lowest next offset of its members per assigned partition, as of the
    /// last commit.
    positions: BTreeMap<SourcePartition, i64>,
}

/// What became of a request to join.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Join {
    /// Queued: the running source adopts the fold between two chunks.
    Queued,
    /// No source runs: the caller starts one with the fold.
    Start,
    /// Not near enough yet (or folding other partitions): fold on alone.
    NotYet,
}

impl SharedSource {
    /// The source of `topics`, read by `projections` projections (not running yet).
    pub fn new(topics: &[String], projections: usize) -> Arc<SharedSource> {
        let mut topics = topics.to_vec();
        topics.sort();
        Arc::new(SharedSource {
            topics,
            members_configured: projections.max(1),
            state: Mutex::new(SourceState::default()),
            joining: AtomicBool::new(false),
            starter: OnceLock::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SourceState> {
        self.state.lock().expect("source lock")
    }

    /// Sets how to start the source's loop (once, by the worker).
    pub fn set_starter(&self, starter: SourceStarter) {
        let _ = self.starter.set(starter);
    }

    /// A member's share of `cache_bytes` of committed states.
    pub(super) fn cache_share(&self, cache_bytes: usize) -> usize {
        cache_bytes / self.members_configured
    }

    /// Starts the source's loop with `members`.
    pub fn start(self: &Arc<Self>, members: Vec<(Arc<Supervisor>, Arc<Fold>)>) {
        self.state().running = true;
        for (_, fold) in &members {
            fold.set_loop_running(true);
        }
        if let Some(starter) = self.starter.get() {
            starter(self.clone(), members);
        }
    }

    /// Asks to join with `fold`, whose loop folds `positions` (its next offset
    /// per assigned partition).
    pub(crate) fn try_join(
        &self,
        supervisor: &Arc<Supervisor>,
        fold: &Arc<Fold>,
        positions: &BTreeMap<SourcePartition, i64>,
    ) -> Join {
        let mut state = self.state();
        if !state.running {
            state.running = true;
            return Join::Start;
        }
        if positions.is_empty() || positions.keys().ne(state.positions.keys()) {
            return Join::NotYet;
        }
        let distance = positions
            .iter()
            .map(|(partition, next)| next.abs_diff(state.positions[partition]))
            .fold(0u64, u64::saturating_add);
        if distance > JOIN_DISTANCE as u64 {
            return Join::NotYet;
        }
        state.joining.push((supervisor.clone(), fold.clone()));
        self.joining.store(true, Ordering::SeqCst);
        Join::Queued
    }

    /// True while folds wait to be adopted.
    pub(super) fn has_joining(&self) -> bool {
        self.joining.load(Ordering::SeqCst)
    }

    /// The folds waiting to be adopted.
    pub(super) fn take_joining(&self) -> Vec<(Arc<Supervisor>, Arc<Fold>)> {
        let mut state = self.state();
        self.joining.store(false, Ordering::SeqCst);
        std::mem::take(&mut state.joining)
    }

    /// Publishes the members' lowest next offset per assigned partition.
    pub(super) fn publish(&self, positions: BTreeMap<SourcePartition, i64>) {
        self.state().positions = positions;
    }

    /// The loop has ended; the folds still waiting to join, which the caller
    /// starts again.
    pub(super) fn ended(&self) -> Vec<(Arc<Supervisor>, Arc<Fold>)> {
        let mut state = self.state();
        state.running = false;
        state.positions.clear();
        self.joining.store(false, Ordering::SeqCst);
        std::mem::take(&mut state.joining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl crate::projection::Projection for Nothing {
        fn apply(
            &self,
            _: &crate::projection::Event<'_>,
            _: &mut dyn crate::projection::PartitionState,
        ) -> Result<(), crate::projection::FoldError> {
            Ok(())
        }

        fn merge(
            &self,
            _: &str,
            _: Vec<crate::projection::State>,
        ) -> Result<Option<serde_json::Value>, crate::projection::FoldError> {
            Ok(None)
        }
    }

    fn fold() -> Fold {
        let generation = crate::store::Generation {
            projection: "a".into(),
            number: 1,
        };
        Fold::new(generation, Arc::new(Nothing), vec!["orders".into()], true)
    }

    #[test]
    fn the_first_fold_starts_the_source_and_others_join_when_near() {
        let source = SharedSource::new(&["orders".to_owned()], 2);
        let config: crate::config::ProjectionConfig =
            serde_json::from_value(serde_json::json!({"name": "a", "kind": "nothing", "topics": ["orders"]}))
                .unwrap();
        let supervisor = Arc::new(Supervisor::new(&config, Arc::new(Nothing), fold(), None));
        let fold = Arc::new(fold());
        let partition = |p| SourcePartition {
            topic: "orders".into(),
            partition: p,
        };
        let at = |a: i64, b: i64| -> BTreeMap<SourcePartition, i64> {
            [(partition(0), a), (partition(1), b)].into()
        };
        assert_eq!(source.try_join(&supervisor, &fold, &at(0, 0)), Join::Start);
        // Running, but no positions published yet (not assigned): fold on alone.
        assert_eq!(source.try_join(&supervisor, &fold, &at(0, 0)), Join::NotYet);
        source.publish(at(50_000, 50_000));
        assert_eq!(
            source.try_join(&supervisor, &fold, &at(39_000, 50_000)),
            Join::NotYet
        );
        assert_eq!(
            source.try_join(&supervisor, &fold, &[(partition(0), 50_000)].into()),
            Join::NotYet,
            "other partitions"
        );
        assert!(!source.has_joining());
        assert_eq!(
            source.try_join(&supervisor, &fold, &at(45_000, 51_000)),
            Join::Queued
        );
        assert!(source.has_joining());
        assert_eq!(source.take_joining().len(), 1);
        assert!(!source.has_joining());
        source.try_join(&supervisor, &fold, &at(50_000, 50_000));
        assert_eq!(source.ended().len(), 1, "waiting folds are handed back");
        assert_eq!(source.try_join(&supervisor, &fold, &at(0, 0)), Join::Start);
    }
}
