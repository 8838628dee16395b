//! How typed partial states ([`crate::projection::Entity::State`]) are stored: a
//! format byte, then the value in postcard, a compact binary serde format (field
//! names are not stored; integers are varints).
//!
//! Stores written before this codec hold JSON text, which never starts with the
//! format byte (JSON starts with `{`, `[`, `"`, a digit, `-`, a letter or white
//! space), so such rows are read as JSON and rewritten in the binary form the
//! next time their key changes; anything else is refused, never misread.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A state that could not be encoded or decoded, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// First byte of a state in this codec's first format.
const POSTCARD_V1: u8 = 0x01;

/// The stored form of `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_extend(state, vec![POSTCARD_V1]).map_err(|e| CodecError(format!("encoding a state: {e}")))
}

/// True for a state written before this codec (JSON text).
pub fn is_json(bytes: &[u8]) -> bool {
    matches!(
        bytes.first(),
        Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' | b' ' | b'\t' | b'\n' | b'\r')
    )
}

/// A state from its stored form: this codec's, or JSON text from an older store.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.first() {
        Some(&POSTCARD_V1) => {
            let (state, rest) = postcard::take_from_bytes(&bytes[1..])
                .map_err(|e| CodecError(format!("a stored state is unreadable: {e}")))?;
            if !rest.is_empty() {
                return Err(CodecError(format!(
                    "a stored state has {} bytes after its value",
                    rest.len()
                )));
            }
            Ok(state)
        }
        Some(_) if is_json(bytes) => serde_json::from_slice(bytes).map_err(|e| {
            CodecError(format!(
                "a stored state (JSON, written before the binary codec) is unreadable: {e}"
            ))
        }),
        Some(other) => Err(CodecError(format!(
            "a stored state starts with format byte {other:#04x}, which this version does not know: \
             it was written by a newer Projector, or damaged; `projector replay` or `projector reset` \
             rebuilds the projection"
        ))),
        None => Err(CodecError("a stored state is empty".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Summary {
        order_id: String,
        status: Status,
        total_cents: i64,
        tracking_id: Option<String>,
        version: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Status {
        Placed,
        Shipped,
    }

    fn summary() -> Summary {
        Summary {
            order_id: "order-1".into(),
            status: Status::Shipped,
            total_cents: -12_345,
            tracking_id: Some("T-1".into()),
            version: 3,
        }
    }

    #[test]
    fn states_round_trip_and_are_smaller_than_json() {
        let bytes = encode(&summary()).unwrap();
        assert_eq!(bytes[0], POSTCARD_V1);
        assert_eq!(decode::<Summary>(&bytes).unwrap(), summary());
        let json = serde_json::to_vec(&summary()).unwrap();
        assert!(
            bytes.len() * 3 < json.len(),
            "{} vs {} bytes",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn json_rows_of_older_stores_are_read() {
        let json = serde_json::to_vec(&summary()).unwrap();
        assert_eq!(decode::<Summary>(&json).unwrap(), summary());
        let pretty = serde_json::to_vec_pretty(&summary()).unwrap();
        assert_eq!(decode::<Summary>(&pretty).unwrap(), summary());
    }

    #[test]
    fn unknown_formats_truncated_and_trailing_bytes_are_refused() {
        let bytes = encode(&summary()).unwrap();
        let unknown = decode::<Summary>(&[0x02, 1, 2]).unwrap_err();
        assert!(unknown.0.contains("format byte 0x02"), "{unknown}");
        assert!(decode::<Summary>(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        let trailing = decode::<Summary>(&longer).unwrap_err();
        assert!(trailing.0.contains("1 bytes after"), "{trailing}");
        assert!(decode::<Summary>(&[]).is_err());
        assert!(decode::<Summary>(b"\xff not json").is_err());
    }
}
