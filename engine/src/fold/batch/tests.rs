//! The open batch against a real RocksDB store: commits, the cache across
//! batches, undo of a failed message, panics, unreadable and older rows.

use std::borrow::Cow;
use std::sync::Arc;

use apache_avro::types::Value;
use serde_json::Value as Json;

use super::*;
use crate::projection::Entity;
use crate::state_codec;

/// Counts events per `key` field; fails on `"fail"`, panics on `"panic"`
/// after changing the state.
struct Counter;

impl Entity for Counter {
    type State = u64;

    fn key<'e>(&self, event: &Event<'e>) -> Result<Option<Cow<'e, str>>, FoldError> {
        match event.payload {
            Value::Record(fields) => Ok(fields.iter().find_map(|(name, value)| match value {
                Value::String(key) if name == "key" => Some(Cow::Borrowed(key.as_str())),
                _ => None,
            })),
            _ => Ok(None),
        }
    }

    fn fold(&self, state: &mut Option<u64>, event: &Event<'_>) -> Result<(), FoldError> {
        let count = state.unwrap_or(0);
        match event.name {
            "fail" => Err(FoldError("refused".into())),
            "panic" => {
                *state = Some(999);
                panic!("boom")
            }
            _ => {
                *state = Some(count + 1);
                Ok(())
            }
        }
    }

    fn merge(&self, _key: &str, partials: Vec<u64>) -> Result<Option<Json>, FoldError> {
        Ok(partials.into_iter().next().map(Json::from))
    }
}

/// A row as the batch wrote it: the count stored under `key`.
fn row(key: &str, p: i32, count: u64) -> (String, SourcePartition, Option<Vec<u8>>) {
    (
        key.to_owned(),
        partition(p),
        Some(state_codec::encode(&count).unwrap()),
    )
}

fn event(name: &str, key: &str) -> CurrentEvent {
    CurrentEvent {
        name: Arc::from(name),
        payload: Value::Record(vec![("key".into(), Value::String(key.into()))]),
    }
}

fn partition(n: i32) -> SourcePartition {
    SourcePartition {
        topic: "t".into(),
        partition: n,
    }
}

fn meta(offset: i64) -> EventMeta {
    EventMeta {
        topic: "t".into(),
        partition: 0,
        offset,
        timestamp_ms: Some(1_000 + offset),
        key: None,
    }
}

/// Folds one `e` event of `key` at `offset` of partition 0 into `batch` and
/// counts it applied.
fn fold_one(batch: &mut Batch, source: (&Store, &Generation), key: &str, offset: i64) {
    batch
        .fold_message(&Counter, source, &[event("e", key)], &meta(offset), &partition(0))
        .unwrap();
    batch.advance(partition(0), offset + 1, Some(1_000 + offset), true);
}

fn store() -> (tempfile::TempDir, Store, Generation) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let generation = store.live_generation("p").unwrap();
    (dir, store, generation)
}

#[test]
fn a_commit_writes_the_changed_keys_and_the_next_offsets() {
    let (_dir, store, generation) = store();
    let mut batch = Batch::new(1 << 20);
    for (offset, key) in ["a", "b", "a"].into_iter().enumerate() {
        fold_one(&mut batch, (&store, &generation), key, offset as i64);
    }
    assert_eq!(batch.events(), 3);
    let taken = batch.take(&Counter).unwrap().expect("something to commit");
    assert_eq!(
        (taken.events, taken.timestamps.clone()),
        (3, vec![1_000, 1_001, 1_002])
    );
    assert_eq!(taken.write.offsets, BTreeMap::from([(partition(0), 3)]));
    store.commit(&generation, &taken.write).unwrap();
    let view = store.read_view(&generation).unwrap();
    assert_eq!(view.partials("a").unwrap(), vec![row("a", 0, 2).2.unwrap()]);
    assert_eq!(view.partials("b").unwrap(), vec![row("b", 0, 1).2.unwrap()]);
    assert!(
        batch.take(&Counter).unwrap().is_none(),
        "an empty batch commits nothing"
    );
}

#[test]
fn a_written_state_is_found_by_the_next_batch_until_its_partition_is_dropped() {
    let (_dir, store, generation) = store();
    let mut batch = Batch::new(1 << 20);
    let source = (&store, &generation);
    let fold = |batch: &mut Batch, offset: i64| {
        fold_one(batch, source, "a", offset);
        let taken = batch.take(&Counter).unwrap().unwrap();
        batch.written(taken.states);
        taken.write.rows
    };
    // Kept as written but never given to the store: only the cache knows it.
    assert_eq!(fold(&mut batch, 0), vec![row("a", 0, 1)]);
    assert_eq!(fold(&mut batch, 1), vec![row("a", 0, 2)]);
    batch.drop_partition(&partition(0));
    assert_eq!(
        fold(&mut batch, 2),
        vec![row("a", 0, 1)],
        "read from the store again, which has nothing"
    );
}

#[test]
fn a_message_whose_second_event_fails_leaves_the_cache_as_before_it() {
    let (_dir, store, generation) = store();
    let mut batch = Batch::new(1 << 20);
    let source = (&store, &generation);
    fold_one(&mut batch, source, "a", 0);
    // An upcaster split this message in three; the last event fails.
    let split = [event("e", "a"), event("e", "b"), event("fail", "c")];
    let stop = batch.fold_message(&Counter, source, &split, &meta(1), &partition(0));
    assert!(
        matches!(&stop, Err(Stop::Poison { reason: PoisonReason::FoldFailed, error }) if error == "refused"),
        "{stop:?}"
    );
    let taken = batch.take(&Counter).unwrap().unwrap();
    assert_eq!(
        taken.write.rows,
        vec![row("a", 0, 1)],
        "only the first message's change"
    );
}

#[test]
fn a_state_row_written_as_json_by_an_older_version_is_read_and_rewritten_binary() {
    let (_dir, store, generation) = store();
    let mut old = BatchWrite::default();
    old.rows.push(("a".into(), partition(0), Some(b"41".to_vec())));
    store.commit(&generation, &old).unwrap();
    let mut batch = Batch::new(1 << 20);
    fold_one(&mut batch, (&store, &generation), "a", 0);
    let taken = batch.take(&Counter).unwrap().unwrap();
    assert_eq!(taken.write.rows, vec![row("a", 0, 42)]);
}

#[test]
fn a_panicking_fold_is_reported_not_propagated() {
    let (_dir, store, generation) = store();
    let mut batch = Batch::new(1 << 20);
    let stop = batch.fold_message(
        &Counter,
        (&store, &generation),
        &[event("panic", "a")],
        &meta(0),
        &partition(0),
    );
    assert!(
        matches!(&stop, Err(Stop::Panicked(message)) if message == "panicked: boom"),
        "{stop:?}"
    );
}

#[test]
fn an_unreadable_stored_state_is_a_store_failure_not_poison() {
    let (dir, store, generation) = store();
    let mut first = Batch::new(1 << 20);
    fold_one(&mut first, (&store, &generation), "a", 0);
    let write = first.take(&Counter).unwrap().unwrap().write;
    store.commit(&generation, &write).unwrap();
    drop(store);
    // Damage the row from outside: bytes in no format the codec knows.
    {
        let path = dir.path();
        let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), path).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), path, &families).unwrap();
        let cf = db.cf_handle("p@1").unwrap();
        let row = db
            .iterator_cf(&cf, rocksdb::IteratorMode::Start)
            .map(|item| item.unwrap().0)
            .find(|key| key.starts_with(b"s"))
            .unwrap();
        db.put_cf(&cf, row, b"\xff not json").unwrap();
    }
    let store = Store::open(dir.path(), false).unwrap();
    let mut batch = Batch::new(1 << 20);
    let stop = batch.fold_message(
        &Counter,
        (&store, &generation),
        &[event("e", "a")],
        &meta(1),
        &partition(0),
    );
    assert!(
        matches!(&stop, Err(Stop::Store(e)) if e.to_string().contains("state row of `a` from t/0")),
        "{stop:?}"
    );
}

#[test]
fn a_fresh_partition_is_not_read_until_the_cache_has_dropped_a_state() {
    let (_dir, store, generation) = store();
    let source = (&store, &generation);
    let commit = |batch: &mut Batch| {
        let taken = batch.take(&Counter).unwrap().unwrap();
        store.commit(&generation, &taken.write).unwrap();
        batch.written(taken.states);
    };
    // A row the store cannot have while the partition has no offset (they are
    // written together), planted to see whether the fold reads it.
    let mut planted = BatchWrite::default();
    planted.rows.push(row("planted", 0, 41));
    store.commit(&generation, &planted).unwrap();
    // Room for about three states in each of the cache's two generations.
    let mut batch = Batch::new(2 * 3 * entry_size());
    batch.note_stored_offset(&partition(0), None);
    fold_one(&mut batch, source, "planted", 0);
    fold_one(&mut batch, source, "a", 1);
    commit(&mut batch);
    let view = store.read_view(&generation).unwrap();
    assert_eq!(
        view.partials("planted").unwrap(),
        vec![row("planted", 0, 1).2.unwrap()],
        "a fresh partition's missing key is not looked up"
    );
    // Enough other keys to push `a` out of the cache: from then on every miss
    // is read from the store, where `a` is 1.
    for (offset, key) in ["b", "c", "d", "e", "f", "g", "h"].into_iter().enumerate() {
        fold_one(&mut batch, source, key, 2 + offset as i64);
        commit(&mut batch);
    }
    fold_one(&mut batch, source, "a", 9);
    let taken = batch.take(&Counter).unwrap().unwrap();
    assert_eq!(
        taken.write.rows,
        vec![row("a", 0, 2)],
        "read back after its eviction"
    );
    // A partition with an offset in the store is always read.
    let mut batch = Batch::new(1 << 20);
    batch.note_stored_offset(&partition(0), Some(10));
    fold_one(&mut batch, source, "planted", 10);
    let taken = batch.take(&Counter).unwrap().unwrap();
    assert_eq!(taken.write.rows, vec![row("planted", 0, 2)]);
}

/// What the committed cache charges for one of these tests' states.
fn entry_size() -> usize {
    super::super::state_cache::entry_bytes(1, state_codec::encode(&1u64).unwrap().len())
}
