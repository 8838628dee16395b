use super::*;
use serde_json::json;

fn steps(text: &str, rust: &RustUpcasters) -> Result<Vec<Step>, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("E.upcast.toml");
    std::fs::write(&file, text).unwrap();
    load_steps(&file, "t.E", rust)
}

#[test]
fn transform_renames_sets_and_drops_from_the_input() {
    let steps = steps(
        "[[step]]\nfrom = 1\nrename = { a = \"b\" }\nset = { c = \"event.a * 2\" }\ndrop = [\"gone\"]\n",
        &RustUpcasters::new(),
    )
    .unwrap();
    let out = steps[0]
        .apply(&json!({"a": 2, "gone": true, "keep": "k"}))
        .unwrap();
    assert_eq!(
        out,
        vec![UpcastOutput {
            event: "t.E".into(),
            version: 2,
            payload: json!({"b": 2, "c": 4, "keep": "k"})
        }]
    );
}

#[test]
fn split_and_drop_produce_several_or_no_events() {
    let steps = steps(
        "[[step]]\nfrom = 1\ndrop_event_if = \"event.n == 0\"\nsplit = [{ event = \"t.A\", version = 1, set = { n = \"event.n\" } }, { event = \"t.B\", version = 3, set = { m = \"event.n + 1\" } }]\n",
        &RustUpcasters::new(),
    )
    .unwrap();
    assert!(steps[0].apply(&json!({"n": 0})).unwrap().is_empty());
    let out = steps[0].apply(&json!({"n": 5})).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[1].event.as_str(), out[1].version, &out[1].payload),
        ("t.B", 3, &json!({"m": 6}))
    );
}

#[test]
fn rust_upcasters_are_found_by_name() {
    fn double(input: &Json) -> Result<Vec<UpcastOutput>, String> {
        Ok(vec![UpcastOutput {
            event: "t.E".into(),
            version: 2,
            payload: json!({"n": input["n"].as_i64().unwrap() * 2}),
        }])
    }
    let mut rust = RustUpcasters::new();
    rust.insert("double", double);
    let steps = steps("[[step]]\nfrom = 1\nrust = \"double\"\n", &rust).unwrap();
    assert_eq!(
        steps[0].apply(&json!({"n": 4})).unwrap()[0].payload,
        json!({"n": 8})
    );
    let error = self::steps("[[step]]\nfrom = 1\nrust = \"nope\"\n", &rust).unwrap_err();
    assert!(error.contains("no Rust upcaster named `nope`"), "{error}");
}

#[test]
fn malformed_steps_are_refused_with_their_position() {
    let none = RustUpcasters::new();
    assert!(steps("[[step]]\nfrom = 1\nset = { x = \"(\" }\n", &none)
        .unwrap_err()
        .contains("step 1: set.x"));
    assert!(steps("[[step]]\nfrom = 2\nto_version = 1\n", &none)
        .unwrap_err()
        .contains("newer version"));
    assert!(steps("[[step]]\nfrom = 1\ncolour = 1\n", &none)
        .unwrap_err()
        .contains("colour"));
    assert!(steps("[[step]]\nfrom = 1\nto_event = \"t.F\"\n", &none)
        .unwrap_err()
        .contains("to_version"));
}
