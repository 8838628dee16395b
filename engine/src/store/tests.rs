//! Unit tests of the store on a temporary RocksDB.

use super::keys::{offset_key, state_key};
use super::*;
use serde_json::json;

/// A state row's bytes (the store does not interpret them).
fn row(state: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&state).unwrap()
}

fn partition(topic: &str, partition: i32) -> SourcePartition {
    SourcePartition {
        topic: topic.into(),
        partition,
    }
}

#[test]
fn state_and_offsets_round_trip_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        let mut batch = BatchWrite::default();
        batch
            .rows
            .push(("a".into(), partition("t", 0), Some(row(json!({"n": 1})))));
        batch
            .rows
            .push(("a".into(), partition("t", 3), Some(row(json!({"n": 2})))));
        batch
            .rows
            .push(("ab".into(), partition("t", 0), Some(row(json!({"n": 9})))));
        batch.offsets.insert(partition("t", 0), 17);
        batch.offsets.insert(partition("t", 3), 4);
        store.commit(&generation, &batch).unwrap();
    }
    let store = Store::open(dir.path(), false).unwrap();
    let generation = store.live_generation("p").unwrap();
    assert_eq!(generation.number, 1);
    assert_eq!(
        store.read_view(&generation).unwrap().partials("a").unwrap(),
        vec![row(json!({"n": 1})), row(json!({"n": 2}))],
        "the partials of `a` and only those"
    );
    assert_eq!(
        store.next_offset(&generation, &partition("t", 0)).unwrap(),
        Some(17)
    );
    assert_eq!(store.next_offset(&generation, &partition("t", 1)).unwrap(), None);
    let offsets = store.offsets(&generation).unwrap();
    assert_eq!(offsets.len(), 2);
    assert_eq!(offsets[&partition("t", 3)], 4);
}

#[test]
fn scans_group_partials_by_key_in_order_with_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let generation = store.live_generation("p").unwrap();
    let mut batch = BatchWrite::default();
    for key in ["b1", "a", "b2", "b3", "c"] {
        batch
            .rows
            .push((key.into(), partition("t", 0), Some(row(json!(key)))));
        batch
            .rows
            .push((key.into(), partition("t", 1), Some(row(json!(1)))));
    }
    batch.offsets.insert(partition("t", 0), 9);
    store.commit(&generation, &batch).unwrap();
    let view = store.read_view(&generation).unwrap();
    let keys = |prefix: &str, after: Option<&str>, limit: usize| -> Vec<String> {
        view.scan(prefix, after, limit, None, &mut |_, _| true)
            .unwrap()
            .into_iter()
            .map(|(k, partials, partitions)| {
                assert_eq!(partials.len(), 2, "every partial of {k}");
                assert_eq!(partitions, [partition("t", 0), partition("t", 1)]);
                k
            })
            .collect()
    };
    assert_eq!(keys("b", None, 10), ["b1", "b2", "b3"]);
    assert_eq!(keys("b", None, 2), ["b1", "b2"]);
    assert_eq!(keys("b", Some("b2"), 10), ["b3"]);
    assert_eq!(keys("", Some("b3"), 10), ["c"]);
    assert_eq!(keys("", None, 100).len(), 5);
    let hidden = view.scan("", None, 2, None, &mut |k, _| k != "a").unwrap();
    assert_eq!(
        hidden.iter().map(|(k, _, _)| k.as_str()).collect::<Vec<_>>(),
        ["b1", "b2"]
    );
    let only = std::collections::BTreeSet::from([partition("t", 1)]);
    let one = view.scan("b", None, 10, Some(&only), &mut |_, _| true).unwrap();
    assert!(
        one.iter()
            .all(|(_, partials, partitions)| partials.len() == 1 && partitions == &[partition("t", 1)]),
        "only the partials of the partitions asked for"
    );
    let partials = view.partials_by_partition("b2").unwrap();
    assert_eq!(
        partials.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        [partition("t", 0), partition("t", 1)]
    );
    assert_eq!(view.offsets().unwrap()[&partition("t", 0)], 9);
}

#[test]
fn reset_drops_every_generation_and_the_live_pointer() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        let other = store.live_generation("p2").unwrap();
        let mut batch = BatchWrite::default();
        batch
            .rows
            .push(("k".into(), partition("t", 0), Some(row(json!(1)))));
        batch.offsets.insert(partition("t", 0), 5);
        store.commit(&generation, &batch).unwrap();
        store.commit(&other, &batch).unwrap();
    }
    let store = Store::open(dir.path(), false).unwrap();
    assert_eq!(store.reset("p").unwrap(), ["p@1"]);
    assert!(store.reset("p").unwrap().is_empty(), "nothing left to drop");
    let generation = store.live_generation("p").unwrap();
    assert!(store.offsets(&generation).unwrap().is_empty(), "p starts over");
    let other = store.live_generation("p2").unwrap();
    assert_eq!(store.offsets(&other).unwrap().len(), 1, "p2 is untouched");
}

#[test]
fn a_replay_switches_in_one_write_and_orphans_are_dropped_on_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let definition = json!({"kind": "k"});
    {
        let store = Store::open(dir.path(), false).unwrap();
        let live = store.live_generation("p").unwrap();
        let replay = store.begin_replay("p", &definition).unwrap();
        assert_eq!((live.number, replay.number), (1, 2));
        assert_eq!(store.replay_generation("p").unwrap(), Some(replay.clone()));
        assert_eq!(store.definition(&replay).unwrap(), Some(definition.clone()));
        store.switch_live(&replay).unwrap();
        assert_eq!(store.live_generation("p").unwrap(), replay);
        assert_eq!(store.replay_generation("p").unwrap(), None);
        // Killed before dropping generation 1; and an aborted replay's mark
        // cleared before its generation was dropped.
        let aborted = store.begin_replay("p", &definition).unwrap();
        assert_eq!(aborted.number, 3);
        store.end_replay("p").unwrap();
    }
    let store = Store::open(dir.path(), false).unwrap();
    assert_eq!(store.generation_numbers("p"), [1, 2, 3]);
    assert_eq!(store.drop_orphans("p").unwrap(), ["p@1", "p@3"]);
    assert_eq!(store.generation_numbers("p"), [2]);
    let next = store.begin_replay("p", &definition).unwrap();
    assert_eq!(
        next.number, 3,
        "numbers above the live one are reused once dropped"
    );
    assert!(
        store.offsets(&next).unwrap().is_empty(),
        "a new generation starts empty"
    );
}

#[test]
fn delete_removes_a_partial() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let generation = store.live_generation("p").unwrap();
    let mut batch = BatchWrite::default();
    batch
        .rows
        .push(("k".into(), partition("t", 0), Some(row(json!(1)))));
    store.commit(&generation, &batch).unwrap();
    let mut batch = BatchWrite::default();
    batch.rows.push(("k".into(), partition("t", 0), None));
    store.commit(&generation, &batch).unwrap();
    assert!(store
        .read_view(&generation)
        .unwrap()
        .partials("k")
        .unwrap()
        .is_empty());
}

#[test]
fn keys_with_nul_bytes_do_not_collide_with_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let generation = store.live_generation("p").unwrap();
    let mut batch = BatchWrite::default();
    batch
        .rows
        .push(("a\0".into(), partition("t", 0), Some(row(json!("nul")))));
    batch
        .rows
        .push(("a".into(), partition("t", 0), Some(row(json!("plain")))));
    store.commit(&generation, &batch).unwrap();
    assert_eq!(
        store.read_view(&generation).unwrap().partials("a").unwrap(),
        vec![row(json!("plain"))]
    );
    assert_eq!(
        store.read_view(&generation).unwrap().partials("a\0").unwrap(),
        vec![row(json!("nul"))]
    );
}

#[test]
fn a_malformed_offset_row_is_an_error_naming_the_row_not_a_restart_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let generation = store.live_generation("p").unwrap();
    let mut batch = BatchWrite::default();
    batch
        .rows
        .push(("k".into(), partition("t", 2), Some(row(json!(1)))));
    batch.offsets.insert(partition("t", 2), 40);
    store.commit(&generation, &batch).unwrap();
    let cf = store.cf(&generation).unwrap();
    store
        .db
        .put_cf(&cf, offset_key(&partition("t", 2)), [1, 2, 3])
        .unwrap();
    let error = store
        .next_offset(&generation, &partition("t", 2))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("offset row of t/2 in column family p@1"),
        "{error}"
    );
    assert!(error.contains("3 bytes (010203)"), "{error}");
    let error = store.offsets(&generation).unwrap_err().to_string();
    assert!(error.contains("offset row of t/2"), "{error}");
    // An offset beyond i64 is no offset either.
    store
        .db
        .put_cf(&cf, offset_key(&partition("t", 2)), u64::MAX.to_be_bytes())
        .unwrap();
    assert!(store.next_offset(&generation, &partition("t", 2)).is_err());
    assert_eq!(
        store.read_view(&generation).unwrap().partials("k").unwrap(),
        vec![row(json!(1))],
        "state untouched"
    );
}

#[test]
fn a_malformed_state_row_is_an_error_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).unwrap();
    let generation = store.live_generation("p").unwrap();
    let cf = store.cf(&generation).unwrap();
    store
        .db
        .put_cf(&cf, state_key("k", &partition("t", 1)), b"{not json")
        .unwrap();
    let error = store
        .partial(&generation, "k", &partition("t", 1), |bytes| {
            serde_json::from_slice::<serde_json::Value>(bytes)
        })
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("state row of `k` from t/1 in column family p@1 is unreadable"),
        "{error}"
    );
}
