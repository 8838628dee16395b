//! The frame and Avro decode path under arbitrary and mutated input: it returns a
//! poison error or events, and never panics or allocates without bound.

use std::sync::{Arc, Once};

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::schemas::RustUpcasters;

/// What the worker sets at start-up, so a corrupt length prefix cannot make
/// apache-avro allocate gigabytes.
fn limit_allocations() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        apache_avro::util::max_allocation_bytes(64 * 1024 * 1024);
    });
}

/// OrderPlaced v1 (upcast twice by CEL rules) and v3 (current) with one valid
/// datum each.
fn fixture() -> (SchemaSet, Vec<(DecodePlan, Vec<u8>)>) {
    limit_allocations();
    let dir = tempfile::tempdir().unwrap();
    let repo = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../schemas/shop.orders");
    let copy = dir.path().join("shop.orders");
    std::fs::create_dir_all(&copy).unwrap();
    for file in [
        "OrderPlaced.v1.avsc",
        "OrderPlaced.v2.avsc",
        "OrderPlaced.v3.avsc",
        "OrderPlaced.upcast.toml",
    ] {
        std::fs::copy(repo.join(file), copy.join(file)).unwrap();
    }
    let schemas = SchemaSet::load(dir.path(), &RustUpcasters::new()).unwrap();
    let items = json!([{"sku": "s-1", "qty": 2, "priceCents": 250}]);
    let samples = [
        (
            "OrderPlaced.v1.avsc",
            json!({"orderId": "o-1", "customerId": "c-1", "items": items, "total": 5.0, "placedAt": 1}),
        ),
        (
            "OrderPlaced.v3.avsc",
            json!({"orderId": "o-2", "customerId": "c-2", "items": items, "totalCents": 500,
                   "currency": "EUR", "itemCount": 1, "placedAt": 2}),
        ),
    ];
    let plans = samples
        .iter()
        .enumerate()
        .map(|(id, (file, value))| {
            let text = std::fs::read_to_string(copy.join(file)).unwrap();
            let writer = Arc::new(Schema::parse_str(&text).unwrap());
            let datum = crate::avro_json::from_json(value, &writer).unwrap();
            let body = apache_avro::to_avro_datum(&writer, datum).unwrap();
            let writer = Arc::new(WriterSchema {
                schema: Arc::unwrap_or_clone(writer),
                schemata: Vec::new(),
            });
            (plan_for(id as u32, writer, &schemas).unwrap(), body)
        })
        .collect();
    (schemas, plans)
}

fn is_poison(outcome: &Result<Vec<CurrentEvent>, DecodeError>) -> bool {
    matches!(
        outcome,
        Err(DecodeError::Poison {
            reason: PoisonReason::DecodeFailed | PoisonReason::UpcastFailed,
            ..
        })
    )
}

#[test]
fn a_schema_that_reuses_a_named_type_decodes_through_the_table_of_names() {
    let writer = Schema::parse_str(
        r#"{"type": "record", "name": "Move", "namespace": "t", "fields": [
            {"name": "from", "type": {"type": "record", "name": "Point", "fields": [{"name": "x", "type": "long"}]}},
            {"name": "to", "type": "Point"}]}"#,
    )
    .unwrap();
    assert!(refers_by_name(&writer));
    let schemas = SchemaSet::default();
    let writer = WriterSchema {
        schema: writer,
        schemata: Vec::new(),
    };
    let plan = plan_for(7, Arc::new(writer), &schemas).unwrap();
    assert!(plan.schemata.is_some());
    let events = decode_body(&plan, 7, &[0x02, 0x04], &schemas).unwrap();
    let point = |x| apache_avro::types::Value::Record(vec![("x".into(), apache_avro::types::Value::Long(x))]);
    assert_eq!(
        events[0].payload,
        apache_avro::types::Value::Record(vec![("from".into(), point(1)), ("to".into(), point(2))])
    );
    let (_, plans) = fixture();
    assert!(plans.iter().all(|(plan, _)| plan.schemata.is_none()));
}

#[test]
fn a_union_writer_decodes_each_branch_as_its_own_event_type() {
    let (schemas, _) = fixture();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/shop.orders");
    let v1 = std::fs::read_to_string(repo.join("OrderPlaced.v1.avsc")).unwrap();
    let stranger = r#"{"type": "record", "name": "Noted", "namespace": "elsewhere", "fields": [
        {"name": "on", "type": {"type": "int", "logicalType": "date"}}]}"#;
    let text = format!(r#"[{v1}, {stranger}, "null"]"#);
    let union = Schema::parse_str(&text).unwrap();
    let writer = Arc::new(WriterSchema {
        schema: union.clone(),
        schemata: Vec::new(),
    });
    let plan = plan_for(3, writer, &schemas).unwrap();
    let Schema::Union(variants) = &union else {
        panic!("a union")
    };
    let encode = |index: u32, json: serde_json::Value| {
        let branch = &variants.variants()[index as usize];
        let value = crate::avro_json::from_json(&json, branch).unwrap();
        apache_avro::to_avro_datum(&union, apache_avro::types::Value::Union(index, Box::new(value))).unwrap()
    };
    let items = json!([{"sku": "s-1", "qty": 2, "priceCents": 250}]);
    let placed = encode(
        0,
        json!({"orderId": "o-1", "customerId": "c-1", "items": items, "total": 5.0, "placedAt": 1}),
    );
    let events = decode_body(&plan, 3, &placed, &schemas).unwrap();
    assert_eq!(&*events[0].name, "shop.orders.OrderPlaced");
    let payload = crate::avro_json::to_json(events[0].payload.clone()).unwrap();
    assert_eq!(
        payload["totalCents"],
        json!(500),
        "v1 upcast to the current version"
    );
    let noted = decode_body(&plan, 3, &encode(1, json!({"on": "2026-01-21"})), &schemas).unwrap();
    assert_eq!(&*noted[0].name, "elsewhere.Noted");
    assert_eq!(
        crate::avro_json::to_json(noted[0].payload.clone()).unwrap(),
        json!({"on": "2026-01-21"}),
        "a passed-through type's logical values have their meaning too"
    );
    let null = apache_avro::to_avro_datum(
        &union,
        apache_avro::types::Value::Union(2, Box::new(apache_avro::types::Value::Null)),
    )
    .unwrap();
    assert!(matches!(
        decode_body(&plan, 3, &null, &schemas),
        Err(DecodeError::Poison {
            reason: PoisonReason::UnknownSchema,
            ..
        })
    ));
}

#[test]
fn valid_datums_decode_and_upcast() {
    let (schemas, plans) = fixture();
    for (id, (plan, body)) in plans.iter().enumerate() {
        let events = decode_body(plan, id as u32, body, &schemas).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(&*events[0].name, "shop.orders.OrderPlaced");
    }
}

#[test]
fn a_length_prefix_beyond_the_message_or_a_negative_block_count_is_poison() {
    let (schemas, plans) = fixture();
    let (plan, _) = &plans[1];
    // orderId's length prefix claims ~2^62 bytes.
    let huge_string = [0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
    // orderId "a", customerId "b", then an items block count of -2^62.
    let negative_block = [
        0x02, b'a', 0x02, b'b', 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F,
    ];
    for body in [&huge_string[..], &negative_block[..]] {
        let outcome = decode_body(plan, 1, body, &schemas);
        assert!(is_poison(&outcome), "{outcome:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_frame_parses_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = frame::parse(Some(&bytes));
    }

    #[test]
    fn arbitrary_bodies_are_poison_or_events(
        which in 0usize..2,
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let (schemas, plans) = fixture();
        let outcome = decode_body(&plans[which].0, which as u32, &body, &schemas);
        prop_assert!(outcome.is_ok() || is_poison(&outcome), "{:?}", outcome);
    }

    #[test]
    fn mutated_valid_bodies_are_poison_or_events(
        which in 0usize..2,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let (schemas, plans) = fixture();
        let (plan, valid) = &plans[which];
        let mut body = valid.clone();
        for (at, byte, kind) in edits {
            if body.is_empty() {
                break;
            }
            let i = at.index(body.len());
            match kind {
                0 => body[i] = byte,
                1 => body.insert(i, byte),
                _ => body.truncate(i),
            }
        }
        let outcome = decode_body(plan, which as u32, &body, &schemas);
        prop_assert!(outcome.is_ok() || is_poison(&outcome), "{:?}", outcome);
    }
}
