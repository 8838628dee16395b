//! The schema set: loading, `check`'s refusals, writer identification, upcasting.

use super::*;
use serde_json::json;

const V1: &str = r#"{"type":"record","name":"Placed","namespace":"t","doc":"v1","fields":[
    {"name":"id","type":"string"},{"name":"total","type":"double"}]}"#;
const V2: &str = r#"{"type":"record","name":"Placed","namespace":"t","fields":[
    {"name":"id","type":"string"},{"name":"cents","type":"long"},{"name":"currency","type":"string","default":"EUR"}]}"#;
const V3: &str = r#"{"type":"record","name":"Placed","namespace":"t","fields":[
    {"name":"id","type":"string"},{"name":"cents","type":"long"},{"name":"currency","type":"string"},
    {"name":"big","type":"boolean","default":false}]}"#;
const UPCAST: &str = r#"
[[step]]
from = 1
set = { cents = "int(math.round(event.total * 100.0))" }
drop = ["total"]

[[step]]
from = 2
set = { big = "event.cents > 1000" }
"#;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new(files: &[(&str, &str)]) -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("t")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join("t").join(name), text).unwrap();
        }
        Dir(dir)
    }

    fn load(&self) -> Result<SchemaSet, SchemaSetError> {
        SchemaSet::load(self.0.path(), &RustUpcasters::new())
    }

    fn check_error(&self) -> String {
        match self.load() {
            Err(e) => e.to_string(),
            Ok(set) => set.check().expect_err("check should fail").to_string(),
        }
    }
}

fn chain() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Placed.v1.avsc", V1),
        ("Placed.v2.avsc", V2),
        ("Placed.v3.avsc", V3),
        ("Placed.upcast.toml", UPCAST),
    ]
}

fn decode_json(set: &SchemaSet, version: u32, json: serde_json::Value) -> Vec<CurrentEvent> {
    let schema = &set.event_type("t.Placed").unwrap().versions[&version].schema;
    let value = avro_json::from_json(&json, schema).unwrap();
    set.upcast(&"t.Placed".into(), version, value).unwrap()
}

#[test]
fn a_valid_chain_checks_and_upcasts_v1_through_v3_in_order() {
    let dir = Dir::new(&chain());
    let set = dir.load().unwrap();
    assert_eq!(set.check().unwrap(), 2);
    let events = decode_json(&set, 1, json!({"id": "a", "total": 12.345}));
    assert_eq!(events.len(), 1);
    let payload = avro_json::to_json(events[0].payload.clone()).unwrap();
    assert_eq!(
        payload,
        json!({"id": "a", "cents": 1235, "currency": "EUR", "big": true})
    );
    let current = decode_json(
        &set,
        3,
        json!({"id": "b", "cents": 5, "currency": "USD", "big": false}),
    );
    assert_eq!(
        avro_json::to_json(current[0].payload.clone()).unwrap()["currency"],
        "USD"
    );
}

#[test]
fn writers_are_identified_by_canonical_form_then_by_resolution() {
    let dir = Dir::new(&chain());
    let set = dir.load().unwrap();
    let docs_differ = Schema::parse_str(&V1.replace("\"doc\":\"v1\",", "\"doc\":\"other words\",")).unwrap();
    assert!(matches!(
        set.identify(&docs_differ),
        WriterMatch::Known {
            version: 1,
            reader: None,
            ..
        }
    ));
    let reordered = Schema::parse_str(
        r#"{"type":"record","name":"Placed","namespace":"t","fields":[{"name":"total","type":"double"},{"name":"id","type":"string"}]}"#,
    )
    .unwrap();
    assert!(matches!(
        set.identify(&reordered),
        WriterMatch::Known {
            version: 1,
            reader: Some(_),
            ..
        }
    ));
    let stranger = Schema::parse_str(
        r#"{"type":"record","name":"Placed","namespace":"t","fields":[{"name":"weird","type":"int"}]}"#,
    )
    .unwrap();
    assert!(matches!(set.identify(&stranger), WriterMatch::Unknown(_)));
    let other_type =
        Schema::parse_str(r#"{"type":"record","name":"New","namespace":"t","fields":[]}"#).unwrap();
    assert!(matches!(set.identify(&other_type), WriterMatch::Unregistered));
}

#[test]
fn rename_split_and_drop_of_event_types() {
    let renamed =
        r#"{"type":"record","name":"Sent","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;
    let line = r#"{"type":"record","name":"Line","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"n","type":"int"}]}"#;
    let old = r#"{"type":"record","name":"Shipped","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"lines","type":"int"}]}"#;
    let dir = Dir::new(&[
        ("Sent.v1.avsc", renamed),
        ("Line.v1.avsc", line),
        ("Shipped.v1.avsc", old),
        (
            "Shipped.upcast.toml",
            r#"[[step]]
from = 1
drop_event_if = "event.lines < 0"
split = [{ event = "t.Sent", version = 1, set = { id = "event.id" } },
         { event = "t.Line", version = 1, set = { id = "event.id", n = "event.lines" } }]
"#,
        ),
    ]);
    let set = dir.load().unwrap();
    set.check().unwrap();
    let schema = &set.event_type("t.Shipped").unwrap().versions[&1].schema;
    let value = avro_json::from_json(&json!({"id": "x", "lines": 2}), schema).unwrap();
    let events = set.upcast(&"t.Shipped".into(), 1, value.clone()).unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.name.as_ref()).collect();
    assert_eq!(names, ["t.Sent", "t.Line"]);
    let dropped = avro_json::from_json(&json!({"id": "x", "lines": -1}), schema).unwrap();
    assert!(set.upcast(&"t.Shipped".into(), 1, dropped).unwrap().is_empty());
}

#[test]
fn a_failing_expression_is_an_upcast_error_naming_the_step() {
    let dir = Dir::new(&chain());
    let set = dir.load().unwrap();
    let schema = &set.event_type("t.Placed").unwrap().versions[&1].schema;
    let value = avro_json::from_json(&json!({"id": "a", "total": 1e300}), schema).unwrap();
    let error = set.upcast(&"t.Placed".into(), 1, value).unwrap_err();
    assert!(
        matches!(&error, UpcastError::Step { step, source: StepError::Expr(_) }
            if step.contains("Placed.upcast.toml: step 1 (from v1)")),
        "{error}"
    );
}

// `projector check` refusals: each names the file at fault.

#[test]
fn refuses_a_schema_that_does_not_parse() {
    let error = Dir::new(&[("Placed.v1.avsc", "{\"type\": \"record\",")]).check_error();
    assert!(error.contains("Placed.v1.avsc"), "{error}");
}

#[test]
fn refuses_a_schema_file_without_version() {
    let error = Dir::new(&[("Placed.avsc", V1)]).check_error();
    assert!(
        error.contains("Placed.avsc") && error.contains("<Name>.v<N>.avsc"),
        "{error}"
    );
}

#[test]
fn refuses_a_version_with_no_path_to_the_newest() {
    let error = Dir::new(&[("Placed.v1.avsc", V1), ("Placed.v2.avsc", V2)]).check_error();
    assert!(
        error.contains("Placed.v1.avsc") && error.contains("no upcaster"),
        "{error}"
    );
}

#[test]
fn refuses_a_step_whose_output_is_not_the_next_schema() {
    let error = Dir::new(&[
        ("Placed.v1.avsc", V1),
        ("Placed.v2.avsc", V2),
        (
            "Placed.upcast.toml",
            "[[step]]\nfrom = 1\nset = { cents = \"'not a number'\" }\ndrop = [\"total\"]\n",
        ),
    ])
    .check_error();
    assert!(
        error.contains("Placed.upcast.toml: step 1 (from v1)") && error.contains("event.cents"),
        "{error}"
    );
}

#[test]
fn refuses_a_step_that_forgets_a_field() {
    let error = Dir::new(&[
        ("Placed.v1.avsc", V1),
        ("Placed.v2.avsc", V2),
        ("Placed.upcast.toml", "[[step]]\nfrom = 1\ndrop = [\"total\"]\n"),
    ])
    .check_error();
    assert!(
        error.contains("Placed.upcast.toml") && error.contains("event.cents: missing"),
        "{error}"
    );
}

#[test]
fn refuses_an_expression_that_does_not_compile() {
    let error = Dir::new(&[
        ("Placed.v1.avsc", V1),
        ("Placed.v2.avsc", V2),
        (
            "Placed.upcast.toml",
            "[[step]]\nfrom = 1\nset = { cents = \"event.total *\" }\n",
        ),
    ])
    .check_error();
    assert!(
        error.contains("Placed.upcast.toml") && error.contains("set.cents"),
        "{error}"
    );
}

#[test]
fn refuses_a_step_to_a_version_that_does_not_exist() {
    let error = Dir::new(&[
        ("Placed.v1.avsc", V1),
        (
            "Placed.upcast.toml",
            "[[step]]\nfrom = 1\nto_version = 4\nset = { cents = \"1\" }\n",
        ),
    ])
    .check_error();
    assert!(
        error.contains("Placed.upcast.toml") && error.contains("v4, which has no schema file"),
        "{error}"
    );
}

#[test]
fn refuses_a_step_from_a_version_that_does_not_exist() {
    let error = Dir::new(&[
        ("Placed.v1.avsc", V1),
        ("Placed.upcast.toml", "[[step]]\nfrom = 7\n"),
    ])
    .check_error();
    assert!(
        error.contains("Placed.upcast.toml") && error.contains("no t.Placed.v7.avsc"),
        "{error}"
    );
}

#[test]
fn refuses_unknown_keys_in_upcast_files_and_steps_for_unknown_types() {
    let error = Dir::new(&[
        ("Placed.v1.avsc", V1),
        ("Placed.upcast.toml", "[[step]]\nfrom = 1\nrenmae = {}\n"),
    ])
    .check_error();
    assert!(
        error.contains("Placed.upcast.toml") && error.contains("renmae"),
        "{error}"
    );
    let error = Dir::new(&[("Placed.v1.avsc", V1), ("Ghost.upcast.toml", "")]).check_error();
    assert!(error.contains("Ghost.upcast.toml"), "{error}");
}

#[test]
fn refuses_a_cycle_between_types() {
    let a = r#"{"type":"record","name":"A","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;
    let b = r#"{"type":"record","name":"B","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;
    let error = Dir::new(&[
        ("A.v1.avsc", a),
        ("B.v1.avsc", b),
        (
            "A.upcast.toml",
            "[[step]]\nfrom = 1\nto_event = \"t.B\"\nto_version = 1\n",
        ),
        (
            "B.upcast.toml",
            "[[step]]\nfrom = 1\nto_event = \"t.A\"\nto_version = 1\n",
        ),
    ])
    .check_error();
    assert!(error.contains("cycle"), "{error}");
}

#[test]
fn refuses_a_schema_whose_name_differs_from_its_file() {
    let error = Dir::new(&[("Other.v1.avsc", V1)]).check_error();
    assert!(
        error.contains("Other.v1.avsc") && error.contains("declares t.Placed"),
        "{error}"
    );
}
