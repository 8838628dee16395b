//! Why an event could not be applied.

use std::fmt;

/// The reasons an event goes to the poison policy; used as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonReason {
    /// Not a Confluent frame (no magic byte, too short, null value).
    BadFrame,
    /// The registry does not know the frame's schema id.
    UnknownSchemaId,
    /// The writer schema matches no known version of its event type.
    UnknownSchema,
    /// The Avro body does not decode with its writer schema.
    DecodeFailed,
    /// An upcaster failed.
    UpcastFailed,
    /// The projection could not fold the event.
    FoldFailed,
    /// Not an event: a partition's stored offset lies outside its log (the topic
    /// was recreated or truncated, or unapplied events expired); the projection
    /// stops rather than fold new data onto old state.
    OffsetsReset,
}

impl PoisonReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PoisonReason::BadFrame => "bad_frame",
            PoisonReason::UnknownSchemaId => "unknown_schema_id",
            PoisonReason::UnknownSchema => "unknown_schema",
            PoisonReason::DecodeFailed => "decode_failed",
            PoisonReason::UpcastFailed => "upcast_failed",
            PoisonReason::FoldFailed => "fold_failed",
            PoisonReason::OffsetsReset => "offsets_reset",
        }
    }
}

impl fmt::Display for PoisonReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
