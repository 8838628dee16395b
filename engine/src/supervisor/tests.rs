//! The supervisor's transitions with fake loops: "spawning" records the fold,
//! a loop is simulated by listening on the fold's commands, setting its state and
//! reporting its exit.

use std::sync::{Arc, Mutex};

use serde_json::json;

use super::*;
use crate::fold_state::Command;
use crate::poison::PoisonReason;
use crate::projection::{Event, FoldError, PartitionState};
use crate::store::BatchWrite;

struct Nothing;

impl Projection for Nothing {
    fn apply(&self, _: &Event<'_>, _: &mut dyn PartitionState) -> Result<(), FoldError> {
        Ok(())
    }

    fn merge(&self, _: &str, _: Vec<crate::projection::State>) -> Result<Option<Json>, FoldError> {
        Ok(None)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    supervisor: Arc<Supervisor>,
    spawned: Arc<Mutex<Vec<Arc<Fold>>>>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), false).unwrap());
        let config: ProjectionConfig =
            serde_json::from_value(json!({"name": "p", "kind": "nothing", "topics": ["t"]})).unwrap();
        let generation = store.live_generation("p").unwrap();
        let live = Fold::new(generation, Arc::new(Nothing), vec!["t".into()], true);
        let supervisor = Arc::new(Supervisor::new(&config, Arc::new(Nothing), live, None));
        let spawned = Arc::new(Mutex::new(Vec::new()));
        let record = spawned.clone();
        supervisor.set_spawner(Box::new(move |fold| record.lock().unwrap().push(fold)));
        Fixture {
            _dir: dir,
            store,
            supervisor,
            spawned,
        }
    }

    fn spawned(&self) -> usize {
        self.spawned.lock().unwrap().len()
    }

    fn last_spawned(&self) -> Arc<Fold> {
        self.spawned.lock().unwrap().last().unwrap().clone()
    }

    /// A loop of `fold` that runs: listening, state `running`, partitions
    /// assigned.
    fn run(&self, fold: &Arc<Fold>) -> std::sync::mpsc::Receiver<Command> {
        let commands = fold.listen();
        fold.set_state(RunState::Running);
        fold.set_assigned();
        commands
    }

    /// The loop of `fold` ends in `state`.
    fn exit(&self, fold: &Arc<Fold>, state: RunState) {
        fold.set_state(state);
        self.supervisor.loop_exited(fold, &self.store, false);
    }

    fn commit_offset(&self, fold: &Fold, next: i64) {
        let mut batch = BatchWrite::default();
        batch.offsets.insert(partition(), next);
        self.store.commit(&fold.generation, &batch).unwrap();
    }

    fn phase(&self) -> &'static str {
        match self.supervisor.state() {
            Lifecycle::Live { .. } => "live",
            Lifecycle::Replaying { .. } => "replaying",
            Lifecycle::HandingOver { target: None, .. } => "handing over, live stopping",
            Lifecycle::HandingOver { target: Some(_), .. } => "handing over, target known",
        }
    }
}

fn partition() -> SourcePartition {
    SourcePartition {
        topic: "t".into(),
        partition: 0,
    }
}

fn poisoned(offset: i64) -> RunState {
    RunState::Poisoned {
        topic: "t".into(),
        partition: 0,
        offset,
        reason: PoisonReason::FoldFailed,
        error: "bad".into(),
    }
}

fn is_stop(commands: &std::sync::mpsc::Receiver<Command>) -> bool {
    matches!(commands.try_recv(), Ok(Command::Stop))
}

#[test]
fn a_caught_up_replay_stops_the_live_loop_folds_to_its_final_offsets_and_switches() {
    let f = Fixture::new();
    f.supervisor.start();
    let live = f.last_spawned();
    let live_commands = f.run(&live);
    f.commit_offset(&live, 5);

    let replay = f.supervisor.start_replay(&f.store).unwrap();
    assert_eq!((f.phase(), f.spawned()), ("replaying", 2));
    assert!(Arc::ptr_eq(&f.last_spawned(), &replay.fold));
    assert!(
        matches!(f.supervisor.start_replay(&f.store), Err(StartError::Running(_))),
        "one replay at a time"
    );
    let _replay_commands = f.run(&replay.fold);

    f.supervisor.replay_caught_up(&replay, &f.store).unwrap();
    assert_eq!(f.phase(), "handing over, live stopping");
    assert!(is_stop(&live_commands), "the live loop is told to stop");
    assert_eq!(f.supervisor.handover_target(&replay), None);
    assert_eq!(f.supervisor.not_ready(), None, "still serving while handing over");

    f.exit(&live, RunState::Stopped);
    assert_eq!(f.phase(), "handing over, target known");
    assert_eq!(
        f.supervisor.handover_target(&replay),
        Some(BTreeMap::from([(partition(), 5)])),
        "the live generation's final offsets"
    );

    f.supervisor.switch(&replay, &f.store).unwrap();
    assert_eq!(f.phase(), "live");
    assert!(Arc::ptr_eq(&f.supervisor.live(), &replay.fold));
    assert!(replay.fold.is_live());
    assert_eq!(f.store.live_generation("p").unwrap(), replay.fold.generation);
    let outcome = f.supervisor.last_replay().unwrap();
    assert_eq!((outcome.generation, outcome.outcome), (2, "switched"));
}

#[test]
fn a_replay_loop_that_stops_during_the_handover_hands_the_projection_back() {
    let f = Fixture::new();
    f.supervisor.start();
    let live = f.last_spawned();
    let live_commands = f.run(&live);
    let replay = f.supervisor.start_replay(&f.store).unwrap();
    let _replay_commands = f.run(&replay.fold);
    f.supervisor.replay_caught_up(&replay, &f.store).unwrap();
    assert!(is_stop(&live_commands));
    f.exit(&live, RunState::Stopped);

    // The replay's loop stops on a poison event before it reaches the target.
    f.exit(&replay.fold, poisoned(3));
    assert_eq!(f.phase(), "replaying", "the replay waits for the operator");
    assert!(Arc::ptr_eq(&f.last_spawned(), &live), "the live loop folds again");
    assert_eq!(live.state(), RunState::Starting);

    // `resume` applies to the stopped replay, the live one being fine.
    let _again = f.run(&live);
    assert_eq!(f.supervisor.resume(), Some(2));
    assert!(Arc::ptr_eq(&f.last_spawned(), &replay.fold));
}

#[test]
fn a_live_loop_stopped_for_a_handover_that_was_called_off_folds_again() {
    let f = Fixture::new();
    f.supervisor.start();
    let live = f.last_spawned();
    let live_commands = f.run(&live);
    let replay = f.supervisor.start_replay(&f.store).unwrap();
    let _replay_commands = f.run(&replay.fold);
    f.supervisor.replay_caught_up(&replay, &f.store).unwrap();
    assert!(is_stop(&live_commands));
    // The replay's loop fails before the live loop has even finished stopping.
    f.exit(&replay.fold, RunState::Failed { error: "x".into() });
    assert_eq!(f.phase(), "replaying");
    let spawned = f.spawned();
    f.exit(&live, RunState::Stopped);
    assert_eq!(f.spawned(), spawned + 1, "restarted once it had exited");
    assert!(Arc::ptr_eq(&f.last_spawned(), &live));
}

#[test]
fn an_abort_drops_the_replay_generation_once_its_loop_has_exited() {
    let f = Fixture::new();
    f.supervisor.start();
    let live = f.last_spawned();
    let _live_commands = f.run(&live);
    let replay = f.supervisor.start_replay(&f.store).unwrap();
    let replay_commands = f.run(&replay.fold);
    assert_eq!(f.supervisor.abort_replay(&f.store), Some(2));
    assert!(is_stop(&replay_commands));
    assert_eq!(f.phase(), "replaying", "until its loop has exited");
    f.exit(&replay.fold, RunState::Stopped);
    assert_eq!(f.phase(), "live");
    assert_eq!(f.store.generation_numbers("p"), [1]);
    assert_eq!(f.supervisor.last_replay().unwrap().outcome, "aborted");
    assert_eq!(f.supervisor.abort_replay(&f.store), None);

    // A replay stopped on a poison event has no loop to wait for.
    let replay = f.supervisor.start_replay(&f.store).unwrap();
    let _commands = f.run(&replay.fold);
    f.exit(&replay.fold, poisoned(1));
    assert_eq!(
        f.supervisor.abort_replay(&f.store),
        Some(replay.fold.generation.number)
    );
    assert_eq!(f.phase(), "live");
    assert_eq!(f.store.generation_numbers("p"), [1]);
}

#[test]
fn skip_restarts_past_the_event_once_the_stopped_loop_has_exited() {
    let f = Fixture::new();
    f.supervisor.start();
    let live = f.last_spawned();
    let _commands = f.run(&live);
    assert_eq!(f.supervisor.resume(), None, "nothing is stopped");
    // Poisoned, its loop still committing and leaving the group.
    live.set_state(poisoned(7));
    assert!(f
        .supervisor
        .not_ready()
        .is_some_and(|why| why.contains("poisoned")));
    let spawned = f.spawned();
    let (generation, position) = f.supervisor.skip_poison().unwrap();
    assert_eq!((generation, position.offset), (1, 7));
    assert_eq!(f.spawned(), spawned, "not while the stopped loop still runs");
    f.supervisor.loop_exited(&live, &f.store, false);
    assert_eq!(f.spawned(), spawned + 1, "restarted once it has exited");
    assert!(live.take_skip("t", 0, 7), "the new loop skips exactly that event");
    assert!(!live.take_skip("t", 0, 7));
}

#[test]
fn a_replay_found_in_the_store_is_started_with_the_live_generation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let config: ProjectionConfig =
        serde_json::from_value(json!({"name": "p", "kind": "nothing", "topics": ["t"]})).unwrap();
    let live = Fold::new(
        store.live_generation("p").unwrap(),
        Arc::new(Nothing),
        vec![],
        true,
    );
    let replaying = store.begin_replay("p", &config.definition()).unwrap();
    let replay = Fold::new(replaying, Arc::new(Nothing), vec![], false);
    let supervisor = Supervisor::new(&config, Arc::new(Nothing), live, Some(replay));
    let spawned = Arc::new(Mutex::new(Vec::new()));
    let record = spawned.clone();
    supervisor.set_spawner(Box::new(move |fold: Arc<Fold>| {
        record.lock().unwrap().push(fold.generation.number)
    }));
    supervisor.start();
    assert_eq!(*spawned.lock().unwrap(), [1, 2]);
    assert!(supervisor
        .replay_status()
        .is_some_and(|s| s["phase"] == "replaying"));
}

#[test]
fn across_workers_the_record_starts_hands_over_and_switches_the_named_generation() {
    let f = Fixture::new();
    f.supervisor.set_clustered();
    f.supervisor.start();
    let live = f.last_spawned();
    let live_commands = f.run(&live);

    // The record names generation 3 (another worker's request, after an abort of 2).
    let replay = f.supervisor.start_replay_at(&f.store, 3).unwrap().unwrap();
    assert_eq!(replay.fold.generation.number, 3);
    assert_eq!(f.phase(), "replaying");
    assert_eq!(f.store.replay_generation("p").unwrap().map(|g| g.number), Some(3));
    assert!(
        matches!(
            f.supervisor.start_replay_at(&f.store, 4),
            Err(StartError::Running(_))
        ),
        "one replay at a time"
    );
    let _replay_commands = f.run(&replay.fold);

    // Handing over stops the live loop; no target is taken from this store.
    assert!(
        !f.supervisor.cluster_handover(4),
        "another generation's step does nothing"
    );
    assert_eq!(f.phase(), "replaying");
    live.set_loop_running(true);
    assert!(
        !f.supervisor.cluster_handover(3),
        "the live loop is still running"
    );
    assert!(is_stop(&live_commands), "the live loop is told to stop");
    live.set_loop_running(false);
    assert!(f.supervisor.cluster_handover(3));
    f.exit(&live, RunState::Stopped);
    assert_eq!(
        f.supervisor.handover_target(&replay),
        None,
        "the record decides the switch"
    );

    assert!(f.supervisor.cluster_switch(&f.store, 3).unwrap());
    assert_eq!(f.phase(), "live");
    assert!(Arc::ptr_eq(&f.supervisor.live(), &replay.fold));
    assert_eq!(f.store.live_generation("p").unwrap().number, 3);
    assert_eq!(f.store.replay_generation("p").unwrap(), None);
    assert_eq!(f.supervisor.last_replay().unwrap().outcome, "switched");
    assert!(
        f.supervisor.start_replay_at(&f.store, 3).unwrap().is_none(),
        "a record of the live generation starts nothing"
    );
}

#[test]
fn a_replay_into_a_generation_not_above_the_live_one_is_refused_by_the_store() {
    let f = Fixture::new();
    let error = f.store.begin_replay_at("p", &json!({}), 1).unwrap_err();
    assert!(
        error.to_string().contains("generation 1 is live already"),
        "{error}"
    );
}
