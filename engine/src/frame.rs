//! The Confluent wire format: magic byte `0`, a 4-byte big-endian schema id, the
//! Avro body.

/// Why a Kafka value is not a Confluent-framed Avro message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The record has no value at all (a tombstone).
    #[error("null value (tombstone)")]
    NullValue,
    /// Shorter than the 5-byte header.
    #[error("value of {0} bytes is shorter than the 5-byte Confluent header")]
    TooShort(usize),
    /// The first byte is not the Confluent magic byte 0.
    #[error("magic byte is {0:#04x}, expected 0x00")]
    BadMagic(u8),
}

/// A framed message: the writer schema's registry id and the Avro body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Registry id of the schema the producer wrote with.
    pub schema_id: u32,
    /// Avro binary encoding of one datum.
    pub body: &'a [u8],
}

/// Splits a Kafka value into schema id and Avro body.
pub fn parse(value: Option<&[u8]>) -> Result<Frame<'_>, FrameError> {
    let value = value.ok_or(FrameError::NullValue)?;
    if value.len() < 5 {
        return Err(FrameError::TooShort(value.len()));
    }
    if value[0] != 0 {
        return Err(FrameError::BadMagic(value[0]));
    }
    let schema_id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok(Frame {
        schema_id,
        body: &value[5..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_and_body() {
        let bytes = [0u8, 0, 0, 1, 2, 0xAA, 0xBB];
        let frame = parse(Some(&bytes)).unwrap();
        assert_eq!(frame.schema_id, 258);
        assert_eq!(frame.body, &[0xAA, 0xBB]);
    }

    #[test]
    fn empty_body_is_a_frame() {
        assert_eq!(parse(Some(&[0, 0, 0, 0, 7])).unwrap().body, &[] as &[u8]);
    }

    #[test]
    fn rejects_what_is_not_a_frame() {
        assert_eq!(parse(None), Err(FrameError::NullValue));
        assert_eq!(parse(Some(&[])), Err(FrameError::TooShort(0)));
        assert_eq!(parse(Some(&[0, 0, 0, 1])), Err(FrameError::TooShort(4)));
        assert_eq!(parse(Some(b"{\"json\": true}")), Err(FrameError::BadMagic(b'{')));
    }
}
