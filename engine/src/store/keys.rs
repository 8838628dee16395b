//! How rows are laid out in a generation's column family:
//! - state rows, `s` + key + source topic + source partition → JSON partial state;
//! - offsets, `o` + topic + partition → next offset to apply (i64, big-endian).
//!
//! Keys and topics are escaped (`0x00` → `0x00 0xFF`) and end with `0x00 0x00`, so
//! rows sort by key and every partial of one key shares a prefix.

use rocksdb::Options;

use super::{Generation, SourcePartition, StoreError};

/// Options of a generation's column family. The fold reads every key it has not
/// cached in the batch; most reads of a first run or a replay miss (a new key),
/// so bloom filters, in the memtable and in the table files, answer those without
/// searching.
pub(super) fn generation_options() -> Options {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    let mut options = Options::default();
    options.set_block_based_table_factory(&table);
    options.set_memtable_whole_key_filtering(true);
    options.set_memtable_prefix_bloom_ratio(0.1);
    options.set_write_buffer_size(16 * 1024 * 1024);
    options
}

/// A stored next offset: 8 bytes, big-endian, within `i64`. Anything else is a
/// store error naming the row, never a partition read again from offset 0.
pub(super) fn decode_offset(
    generation: &Generation,
    partition: &SourcePartition,
    bytes: &[u8],
) -> Result<i64, StoreError> {
    decode_offset_in(&generation.column_family(), partition, bytes)
}

pub(super) fn decode_offset_in(
    column_family: &str,
    partition: &SourcePartition,
    bytes: &[u8],
) -> Result<i64, StoreError> {
    decode_u64(bytes)
        .and_then(|n| i64::try_from(n).ok())
        .ok_or_else(|| StoreError {
            context: format!("the offset row of {partition} in column family {column_family}"),
            source: format!(
                "it holds {} bytes ({}), not an 8-byte big-endian offset; the store is damaged: \
                 `projector reset` rebuilds the projection from the log",
                bytes.len(),
                hex(bytes)
            )
            .into(),
        })
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

pub(super) fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    for &byte in bytes {
        out.push(byte);
        if byte == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

/// Reads one escaped component from the front of `rest`.
pub(super) fn unescape_next(rest: &mut &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == 0 {
            match rest.get(i + 1)? {
                0 => {
                    *rest = &rest[i + 2..];
                    return Some(out);
                }
                0xFF => {
                    out.push(0);
                    i += 2;
                    continue;
                }
                _ => return None,
            }
        }
        out.push(rest[i]);
        i += 1;
    }
    None
}

pub(super) fn state_prefix(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 3);
    out.push(b's');
    push_escaped(&mut out, key.as_bytes());
    out
}

pub(super) fn state_key(key: &str, partition: &SourcePartition) -> Vec<u8> {
    let mut out = state_prefix(key);
    push_escaped(&mut out, partition.topic.as_bytes());
    out.extend_from_slice(&partition.partition.to_be_bytes());
    out
}

pub(super) fn offset_key(partition: &SourcePartition) -> Vec<u8> {
    let mut out = vec![b'o'];
    push_escaped(&mut out, partition.topic.as_bytes());
    out.extend_from_slice(&partition.partition.to_be_bytes());
    out
}
