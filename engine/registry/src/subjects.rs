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
    /// The named types it takes from other subjects.
    pub references: Vec<Reference>,
}

/// A Confluent schema reference: the named type `name` is defined by `subject`'s
/// `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// Full name of the type, as the referring schema writes it.
    pub name: String,
    /// The subject defining it.
    pub subject: String,
    /// Its version there.
    pub version: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    /// Schema text by id; ids are 1-based and dense.
    schemas: Vec<String>,
    /// The references of the schemas that have any, by id.
    #[serde(default)]
    references: BTreeMap<u32, Vec<Reference>>,
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
            .enumerate()
            .map(|(index, text)| {
                let references = stored.references.get(&(index as u32 + 1)).map(Vec::as_slice);
                identity(text, references.unwrap_or_default())
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("stored schema no longer has an identity: {}", e.message))?;
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
            references: self.references(id).to_vec(),
        }
    }

    /// The references of schema `id` (none for an unknown id).
    pub fn references(&self, id: u32) -> &[Reference] {
        self.stored
            .references
            .get(&id)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The ids of the schemas that reference `subject`'s `version`.
    pub fn referenced_by(&self, subject: &str, version: &str) -> Result<Vec<u32>, RegistryFault> {
        let target = self.version(subject, version)?;
        Ok(self
            .stored
            .references
            .iter()
            .filter(|(_, references)| {
                references
                    .iter()
                    .any(|r| r.subject == target.subject && r.version == target.version)
            })
            .map(|(id, _)| *id)
            .collect())
    }

    /// The texts of every schema `references` lead to, transitively, for parsing
    /// a schema that uses them; a reference to a subject or version that does not
    /// exist is an invalid schema (42201), as in Confluent's registry.
    fn referenced_texts(&self, references: &[Reference]) -> Result<Vec<String>, RegistryFault> {
        let mut texts = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut pending: Vec<Reference> = references.to_vec();
        while let Some(reference) = pending.pop() {
            if !seen.insert((reference.subject.clone(), reference.version)) {
                continue;
            }
            let found = self
                .version(&reference.subject, &reference.version.to_string())
                .map_err(|fault| {
                    RegistryFault::invalid_schema(format!(
                        "reference {} to subject '{}' version {}: {}",
                        reference.name, reference.subject, reference.version, fault.message
                    ))
                })?;
            pending.extend(found.references);
            texts.push(found.schema);
        }
        Ok(texts)
    }

    fn parse_with(&self, schema: &str, references: &[Reference]) -> Result<Schema, RegistryFault> {
        if references.is_empty() {
            return parse(schema);
        }
        let texts = self.referenced_texts(references)?;
        Schema::parse_str_with_list(schema, &texts)
            .map(|(schema, _)| schema)
            .map_err(RegistryFault::invalid_schema)
    }

    /// The schema text with a global id.
    pub fn schema(&self, id: u32) -> Result<&str, RegistryFault> {
        id.checked_sub(1)
            .and_then(|index| self.stored.schemas.get(index as usize))
            .map(String::as_str)
            .ok_or_else(|| RegistryFault::schema_not_found(&id.to_string()))
    }

    /// The version of `subject` that holds `schema` with `references`.
    pub fn lookup(
        &self,
        subject: &str,
        schema: &str,
        references: &[Reference],
    ) -> Result<SubjectVersion, RegistryFault> {
        let ids = self.ids(subject)?;
        self.parse_with(schema, references)?;
        let canonical = identity(schema, references)?;
        ids.iter()
            .enumerate()
            .find(|(_, id)| self.canonical[**id as usize - 1] == canonical)
            .map(|(index, id)| self.subject_version(subject, index as u32 + 1, *id))
            .ok_or_else(|| RegistryFault::schema_not_found("not found under this subject"))
    }

    /// Registers `schema` with `references` under `subject` (a no-op returning the
    /// existing id when it is already there), after the subject's compatibility
    /// check.
    pub fn register(
        &mut self,
        subject: &str,
        schema: &str,
        references: &[Reference],
    ) -> Result<u32, RegistryFault> {
        let parsed = self.parse_with(schema, references)?;
        let canonical = identity(schema, references)?;
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
                let id = self.stored.schemas.len() as u32;
                if !references.is_empty() {
                    self.stored.references.insert(id, references.to_vec());
                }
                id
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
            let old = self.parse_with(&self.stored.schemas[*id as usize - 1], self.references(*id))?;
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

/// The schema's JSON, re-serialized compactly, with its references: what makes
/// two registrations the same schema.
fn identity(schema: &str, references: &[Reference]) -> Result<String, RegistryFault> {
    let json: serde_json::Value = serde_json::from_str(schema).map_err(RegistryFault::invalid_schema)?;
    if references.is_empty() {
        return Ok(json.to_string());
    }
    let references = serde_json::to_string(references).map_err(RegistryFault::internal)?;
    Ok(format!("{json} {references}"))
}

fn parse(schema: &str) -> Result<Schema, RegistryFault> {
    Schema::parse_str(schema).map_err(RegistryFault::invalid_schema)
}

#[cfg(test)]
mod tests;
