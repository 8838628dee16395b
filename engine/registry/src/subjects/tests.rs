use super::*;

const V1: &str = r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"a","type":"string"}]}"#;
const V2_WITH_DEFAULT: &str = r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"a","type":"string"},{"name":"b","type":"int","default":0}]}"#;
const V2_NO_DEFAULT: &str = r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"a","type":"string"},{"name":"b","type":"int"}]}"#;

#[test]
fn ids_are_global_and_registration_is_idempotent() {
    let mut subjects = Subjects::open(None).unwrap();
    let id = subjects.register("s-t.E", V1, &[]).unwrap();
    assert_eq!(subjects.register("s-t.E", V1, &[]).unwrap(), id);
    // The same schema under another subject keeps its id.
    assert_eq!(subjects.register("other", V1, &[]).unwrap(), id);
    assert_eq!(subjects.versions("s-t.E").unwrap(), vec![1]);
    assert_eq!(subjects.schema(id).unwrap(), V1);
    // Whitespace does not make another schema; docs do.
    let spaced = V1.replace(",", ", ");
    assert_eq!(subjects.register("s-t.E", &spaced, &[]).unwrap(), id);
    let documented = V1.replace("\"name\":\"E\"", "\"name\":\"E\",\"doc\":\"d\"");
    assert_ne!(subjects.register("s-t.E", &documented, &[]).unwrap(), id);
}

#[test]
fn backward_check_refuses_a_new_field_without_default() {
    let mut subjects = Subjects::open(None).unwrap();
    subjects.register("s", V1, &[]).unwrap();
    let fault = subjects.register("s", V2_NO_DEFAULT, &[]).unwrap_err();
    assert_eq!(fault.status, 409);
    let id = subjects.register("s", V2_WITH_DEFAULT, &[]).unwrap();
    assert_eq!(subjects.version("s", "latest").unwrap().id, id);
    assert_eq!(subjects.version("s", "2").unwrap().version, 2);
}

#[test]
fn none_allows_anything_and_unknowns_have_confluent_codes() {
    let mut subjects = Subjects::open(None).unwrap();
    subjects.register("s", V1, &[]).unwrap();
    subjects
        .set_compatibility(Some("s"), Compatibility::None)
        .unwrap();
    subjects.register("s", V2_NO_DEFAULT, &[]).unwrap();
    assert_eq!(subjects.versions("nope").unwrap_err().code, 40401);
    assert_eq!(subjects.version("s", "9").unwrap_err().code, 40402);
    assert_eq!(subjects.schema(99).unwrap_err().code, 40403);
    assert_eq!(subjects.register("s", "{not json", &[]).unwrap_err().code, 42201);
}

#[test]
fn persists_to_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.json");
    let id = {
        let mut subjects = Subjects::open(Some(file.clone())).unwrap();
        subjects.register("s", V1, &[]).unwrap()
    };
    let subjects = Subjects::open(Some(file)).unwrap();
    assert_eq!(subjects.lookup("s", V1, &[]).unwrap().id, id);
}

const LINE: &str =
    r#"{"type":"record","name":"Line","namespace":"t","fields":[{"name":"sku","type":"string"}]}"#;
const ORDER: &str = r#"{"type":"record","name":"Order","namespace":"t","fields":[{"name":"lines","type":{"type":"array","items":"t.Line"}}]}"#;
const EITHER: &str = r#"["t.Order","t.E"]"#;

fn reference(name: &str, subject: &str, version: u32) -> Reference {
    Reference {
        name: name.into(),
        subject: subject.into(),
        version,
    }
}

#[test]
fn references_resolve_transitively_and_are_part_of_a_schema() {
    let mut subjects = Subjects::open(None).unwrap();
    subjects.register("t.Line", LINE, &[]).unwrap();
    // Without its reference the schema does not parse.
    assert_eq!(subjects.register("t.Order", ORDER, &[]).unwrap_err().code, 42201);
    let order = subjects
        .register("t.Order", ORDER, &[reference("t.Line", "t.Line", 1)])
        .unwrap();
    subjects.register("t.E", V1, &[]).unwrap();
    let union_refs = [reference("t.Order", "t.Order", 1), reference("t.E", "t.E", 1)];
    let union = subjects.register("both-value", EITHER, &union_refs).unwrap();
    assert_eq!(subjects.references(union), union_refs);
    assert_eq!(
        subjects.version("both-value", "latest").unwrap().references,
        union_refs
    );
    assert_eq!(
        subjects.lookup("both-value", EITHER, &union_refs).unwrap().id,
        union
    );
    assert_eq!(subjects.referenced_by("t.Order", "1").unwrap(), vec![union]);
    assert_eq!(subjects.referenced_by("t.Line", "1").unwrap(), vec![order]);
    assert!(subjects.referenced_by("t.E", "1").unwrap().contains(&union));
    // The same text with other references is another schema.
    subjects
        .set_compatibility(Some("both-value"), Compatibility::None)
        .unwrap();
    let other = subjects
        .register("both-value", r#"["t.E"]"#, &[reference("t.E", "t.E", 1)])
        .unwrap();
    assert_ne!(other, union);
}

#[test]
fn a_reference_to_an_unknown_subject_or_version_is_an_invalid_schema() {
    let mut subjects = Subjects::open(None).unwrap();
    subjects.register("t.Line", LINE, &[]).unwrap();
    for missing in [reference("t.Line", "nope", 1), reference("t.Line", "t.Line", 2)] {
        let fault = subjects.register("t.Order", ORDER, &[missing]).unwrap_err();
        assert_eq!((fault.status, fault.code), (422, 42201), "{}", fault.message);
    }
}
