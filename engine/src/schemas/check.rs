//! Proving a schema set usable before any event arrives (`projector check`, and
//! `run` at start-up).

use std::collections::HashSet;

use super::{error_at, short_name, SchemaSet, SchemaSetError, SchemaVersion, Step};
use crate::avro_json;

impl SchemaSet {
    /// Proves the set usable: every version of every type reaches its type's newest
    /// version (or a retired type's successor), and every step, run on a generated
    /// sample of its input, produces events valid under their target schemas.
    /// Returns the number of steps checked.
    pub fn check(&self) -> Result<usize, SchemaSetError> {
        let mut checked = 0;
        for event_type in self.types.values() {
            let newest = event_type.current().version;
            for version in event_type.versions.values() {
                match event_type.steps.get(&version.version) {
                    None if version.version == newest => {}
                    None => {
                        return Err(error_at(
                            &version.path,
                            format!(
                                "{} v{} has no upcaster to a newer version: add a [[step]] with from = {} to {}.upcast.toml",
                                event_type.name,
                                version.version,
                                version.version,
                                short_name(&event_type.name)
                            ),
                        ))
                    }
                    Some(step) => {
                        self.check_step(step, version)?;
                        checked += 1;
                    }
                }
            }
        }
        for event_type in self.types.values() {
            for version in event_type.versions.keys() {
                self.check_terminates(&event_type.name, *version)?;
            }
        }
        Ok(checked)
    }

    fn check_step(&self, step: &Step, input: &SchemaVersion) -> Result<(), SchemaSetError> {
        let failed = |message: String| error_at(&step.file, format!("{}: {message}", step.describe()));
        for (event, version) in step.declared_targets() {
            self.version(&event, version)
                .ok_or_else(|| failed(format!("produces {event} v{version}, which has no schema file")))?;
        }
        let sample = avro_json::sample(&input.schema);
        for output in step
            .apply(&sample)
            .map_err(|e| failed(format!("on a sample input: {e}")))?
        {
            let target = self.version(&output.event, output.version).ok_or_else(|| {
                failed(format!(
                    "produced {} v{}, which has no schema file",
                    output.event, output.version
                ))
            })?;
            target.from_json.convert(&output.payload).map_err(|e| {
                failed(format!(
                    "its output is not a valid {} v{} ({}): {e}",
                    output.event,
                    output.version,
                    target.path.display()
                ))
            })?;
        }
        // A transform runs on the decoded record, not on JSON: prove that path too.
        if let Some(transform) = step.as_transform() {
            let no_sample =
                |e: &dyn std::fmt::Display| failed(format!("its input schema has no valid sample: {e}"));
            let record = input.from_json.convert(&sample).map_err(|e| no_sample(&e))?;
            let record = input.plain(record).map_err(|e| no_sample(&e))?;
            if let Some(fields) = transform
                .apply(record)
                .map_err(|e| failed(format!("on a sample input: {e}")))?
            {
                let target = self
                    .version(transform.to_event, transform.to_version)
                    .ok_or_else(|| failed("its target has no schema file".to_owned()))?;
                target.from_json.record(fields).map_err(|e| {
                    failed(format!(
                        "its output is not a valid {} v{} ({}): {e}",
                        transform.to_event,
                        transform.to_version,
                        target.path.display()
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Follows declared steps from (name, version); fails on a cycle.
    fn check_terminates(&self, name: &str, version: u32) -> Result<(), SchemaSetError> {
        let mut seen = HashSet::new();
        let mut pending = vec![(name.to_owned(), version)];
        while let Some((name, version)) = pending.pop() {
            let Some(event_type) = self.types.get(&name) else {
                continue;
            };
            let Some(step) = event_type.steps.get(&version) else {
                continue;
            };
            if !seen.insert((name.clone(), version)) {
                return Err(error_at(
                    &step.file,
                    format!("{}: the upcasters form a cycle", step.describe()),
                ));
            }
            pending.extend(step.declared_targets());
        }
        Ok(())
    }
}
