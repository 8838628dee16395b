//! The registry's data: schemas by global id, subjects as lists of versions,
//! compatibility levels; optionally persisted to a JSON file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

/// Confluent's compatibility levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// No check.
    None,
    /// The new schema can read data written with the latest one.
    Backward,
    /// ... with every earlier one.
    BackwardTransitive,
    /// The latest schema can read data written with the new one.
    Forward,
    /// ... every earlier one can.
    ForwardTransitive,
    /// Backward and forward.
    Full,
    /// Backward and forward, against every earlier one.
    FullTransitive,
}

impl Compatibility {
    fn transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Compatibility::Backward
                | Compatibility::BackwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Compatibility::Forward
                | Compatibility::ForwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }
}

/// A registry error, with Confluent's error code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryFault {
    /// HTTP status.
    pub status: u16,
    /// Confluent error code.
    pub code: u32,
    /// Message.
    pub message: String,
}

impl RegistryFault {
    fn new(status: u16, code: u32, message: impl Into<String>) -> Self {
        RegistryFault {
            status,
            code,
            message: message.into(),
        }
    }

    /// 40401
    pub fn subject_not_found(subject: &str) -> Self {
        Self::new(404, 40401, format!("Subject '{subject}' not found."))
    }

    /// 40402
    pub fn version_not_found(version: &str) -> Self {
        Self::new(404, 40402, format!("Version {version} not found."))
    }

    /// 40403
    pub fn schema_not_found(what: &str) -> Self {
        Self::new(404, 40403, format!("Schema {what} not found."))
    }

    /// 42201
    pub fn invalid_schema(message: impl std::fmt::Display) -> Self {
        Self::new(422, 42201, format!("Invalid schema: {message}"))
    }

    /// 42202 (and other unprocessable requests)
    pub fn invalid_version(version: &str) -> Self {
        Self::new(
            422,
            42202,
            format!("The specified version '{version}' is not a valid version id."),
        )
    }

    /// 42203
    pub fn invalid_compatibility(level: &str) -> Self {
        Self::new(422, 42203, format!("Invalid compatibility level: {level}"))
    }

    /// 422 for a body that is not the expected JSON.
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::new(422, 422, format!("Unprocessable request: {message}"))
    }

    /// 500 (storage).
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(500, 50001, format!("Error in the backend data store: {message}"))
    }
}

/// A version of a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectVersion {
    /// Subject name.
    pub subject: String,
    /// Version number, from 1.
    pub version: u32,
    /// Global schema id.
    pub id: u32,
    /// Schema text as first registered.
    pub schema: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    /// Schema text by id; ids are 1-based and dense.
    schemas: Vec<String>,
    subjects: BTreeMap<String, Vec<u32>>,
    global_compatibility: Option<Compatibility>,
    subject_compatibility: BTreeMap<String, Compatibility>,
}

/// Subjects and schemas.
pub struct Subjects {
    stored: Stored,
    /// Identity of each schema, by id - 1: its JSON with whitespace normalized.
    /// Like Confluent's, docs and field order count: a schema that differs only in
    /// its docs is another schema with its own id.
    canonical: Vec<String>,
    file: Option<PathBuf>,
}

impl Subjects {
    /// An empty registry, persisted to `file` when given (and loaded from it if it
    /// exists).
    pub fn open(file: Option<PathBuf>) -> Result<Subjects, String> {
        let stored: Stored = match &file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            _ => Stored::default(),
        };
        let canonical = stored
            .schemas
            .iter()
            .map(|text| identity(text))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("stored schema no longer parses: {}", e.message))?;
        Ok(Subjects {
            stored,
            canonical,
            file,
        })
    }

    fn save(&self) -> Result<(), RegistryFault> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(&self.stored).map_err(RegistryFault::internal)?;
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, text).map_err(RegistryFault::internal)?;
        std::fs::rename(&temporary, path).map_err(RegistryFault::internal)
    }

    /// Every subject, sorted.
    pub fn subjects(&self) -> Vec<String> {
        self.stored.subjects.keys().cloned().collect()
    }

    /// The version numbers of a subject.
    pub fn versions(&self, subject: &str) -> Result<Vec<u32>, RegistryFault> {
        let ids = self.ids(subject)?;
        Ok((1..=ids.len() as u32).collect())
    }

    fn ids(&self, subject: &str) -> Result<&Vec<u32>, RegistryFault> {
        self.stored
            .subjects
            .get(subject)
            .ok_or_else(|| RegistryFault::subject_not_found(subject))
    }

    /// One version of a subject: a number, `latest` or `-1`.
    pub fn version(&self, subject: &str, version: &str) -> Result<SubjectVersion, RegistryFault> {
        let ids = self.ids(subject)?;
        let number: u32 = match version {
            "latest" | "-1" => ids.len() as u32,
            other => other
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| RegistryFault::invalid_version(other))?,
        };
        let id = *ids
            .get(number as usize - 1)
            .ok_or_else(|| RegistryFault::version_not_found(version))?;
        Ok(self.subject_version(subject, number, id))
    }

    fn subject_version(&self, subject: &str, version: u32, id: u32) -> SubjectVersion {
        SubjectVersion {
            subject: subject.to_owned(),
            version,
            id,
            schema: self.stored.schemas[id as usize - 1].clone(),
        }
    }

    /// The schema text with a global id.
    pub fn schema(&self, id: u32) -> Result<&str, RegistryFault> {
        id.checked_sub(1)
            .and_then(|index| self.stored.schemas.get(index as usize))
            .map(String::as_str)
            .ok_or_else(|| RegistryFault::schema_not_found(&id.to_string()))
    }

    /// The version of `subject` that holds `schema`.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<SubjectVersion, RegistryFault> {
        let ids = self.ids(subject)?;
        let canonical = identity(schema)?;
        ids.iter()
            .enumerate()
            .find(|(_, id)| self.canonical[**id as usize - 1] == canonical)
            .map(|(index, id)| self.subject_version(subject, index as u32 + 1, *id))
            .ok_or_else(|| RegistryFault::schema_not_found("not found under this subject"))
    }

    /// Registers `schema` under `subject` (a no-op returning the existing id when it
    /// is already there), after the subject's compatibility check.
    pub fn register(&mut self, subject: &str, schema: &str) -> Result<u32, RegistryFault> {
        let parsed = parse(schema)?;
        let canonical = identity(schema)?;
        let existing_ids = self.stored.subjects.get(subject).cloned().unwrap_or_default();
        if let Some(id) = existing_ids
            .iter()
            .find(|id| self.canonical[**id as usize - 1] == canonical)
        {
            return Ok(*id);
        }
        self.check_compatible(subject, &parsed, &existing_ids)?;
        let id = match self.canonical.iter().position(|c| *c == canonical) {
            Some(index) => index as u32 + 1,
            None => {
                self.stored.schemas.push(schema.to_owned());
                self.canonical.push(canonical);
                self.stored.schemas.len() as u32
            }
        };
        self.stored
            .subjects
            .entry(subject.to_owned())
            .or_default()
            .push(id);
        self.save()?;
        Ok(id)
    }

    fn check_compatible(&self, subject: &str, new: &Schema, ids: &[u32]) -> Result<(), RegistryFault> {
        let level = self.compatibility(subject);
        let earlier: &[u32] = if level.transitive() {
            ids
        } else {
            ids.last().map(std::slice::from_ref).unwrap_or(&[])
        };
        for id in earlier {
            let old = parse(&self.stored.schemas[*id as usize - 1])?;
            let mut problems = Vec::new();
            if level.backward() {
                if let Err(e) = SchemaCompatibility::can_read(&old, new) {
                    problems.push(format!(
                        "the new schema cannot read data written with schema id {id}: {e}"
                    ));
                }
            }
            if level.forward() {
                if let Err(e) = SchemaCompatibility::can_read(new, &old) {
                    problems.push(format!(
                        "schema id {id} cannot read data written with the new schema: {e}"
                    ));
                }
            }
            if !problems.is_empty() {
                return Err(RegistryFault::new(
                    409,
                    409,
                    format!(
                        "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" ({level:?}): {}",
                        problems.join("; ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The level in force for `subject`.
    pub fn compatibility(&self, subject: &str) -> Compatibility {
        self.stored
            .subject_compatibility
            .get(subject)
            .copied()
            .unwrap_or_else(|| self.global_compatibility())
    }

    /// The global level (BACKWARD unless set).
    pub fn global_compatibility(&self) -> Compatibility {
        self.stored
            .global_compatibility
            .unwrap_or(Compatibility::Backward)
    }

    /// The level set on `subject` itself, if any.
    pub fn subject_compatibility(&self, subject: &str) -> Option<Compatibility> {
        self.stored.subject_compatibility.get(subject).copied()
    }

    /// Sets the global level, or a subject's when `subject` is given.
    pub fn set_compatibility(
        &mut self,
        subject: Option<&str>,
        level: Compatibility,
    ) -> Result<(), RegistryFault> {
        match subject {
            Some(subject) => {
                self.stored
                    .subject_compatibility
                    .insert(subject.to_owned(), level);
            }
            None => self.stored.global_compatibility = Some(level),
        }
        self.save()
    }
}

/// The schema's JSON, re-serialized compactly: what makes two registrations the
/// same schema.
fn identity(schema: &str) -> Result<String, RegistryFault> {
    parse(schema)?;
    let json: serde_json::Value = serde_json::from_str(schema).map_err(RegistryFault::invalid_schema)?;
    Ok(json.to_string())
}

fn parse(schema: &str) -> Result<Schema, RegistryFault> {
    Schema::parse_str(schema).map_err(RegistryFault::invalid_schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str =
        r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"a","type":"string"}]}"#;
    const V2_WITH_DEFAULT: &str = r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"a","type":"string"},{"name":"b","type":"int","default":0}]}"#;
    const V2_NO_DEFAULT: &str = r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"a","type":"string"},{"name":"b","type":"int"}]}"#;

    #[test]
    fn ids_are_global_and_registration_is_idempotent() {
        let mut subjects = Subjects::open(None).unwrap();
        let id = subjects.register("s-t.E", V1).unwrap();
        assert_eq!(subjects.register("s-t.E", V1).unwrap(), id);
        // The same schema under another subject keeps its id.
        assert_eq!(subjects.register("other", V1).unwrap(), id);
        assert_eq!(subjects.versions("s-t.E").unwrap(), vec![1]);
        assert_eq!(subjects.schema(id).unwrap(), V1);
        // Whitespace does not make another schema; docs do.
        let spaced = V1.replace(",", ", ");
        assert_eq!(subjects.register("s-t.E", &spaced).unwrap(), id);
        let documented = V1.replace("\"name\":\"E\"", "\"name\":\"E\",\"doc\":\"d\"");
        assert_ne!(subjects.register("s-t.E", &documented).unwrap(), id);
    }

    #[test]
    fn backward_check_refuses_a_new_field_without_default() {
        let mut subjects = Subjects::open(None).unwrap();
        subjects.register("s", V1).unwrap();
        let fault = subjects.register("s", V2_NO_DEFAULT).unwrap_err();
        assert_eq!(fault.status, 409);
        let id = subjects.register("s", V2_WITH_DEFAULT).unwrap();
        assert_eq!(subjects.version("s", "latest").unwrap().id, id);
        assert_eq!(subjects.version("s", "2").unwrap().version, 2);
    }

    #[test]
    fn none_allows_anything_and_unknowns_have_confluent_codes() {
        let mut subjects = Subjects::open(None).unwrap();
        subjects.register("s", V1).unwrap();
        subjects
            .set_compatibility(Some("s"), Compatibility::None)
            .unwrap();
        subjects.register("s", V2_NO_DEFAULT).unwrap();
        assert_eq!(subjects.versions("nope").unwrap_err().code, 40401);
        assert_eq!(subjects.version("s", "9").unwrap_err().code, 40402);
        assert_eq!(subjects.schema(99).unwrap_err().code, 40403);
        assert_eq!(subjects.register("s", "{not json").unwrap_err().code, 42201);
    }

    #[test]
    fn persists_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("registry.json");
        let id = {
            let mut subjects = Subjects::open(Some(file.clone())).unwrap();
            subjects.register("s", V1).unwrap()
        };
        let subjects = Subjects::open(Some(file)).unwrap();
        assert_eq!(subjects.lookup("s", V1).unwrap().id, id);
    }
}
