//! The partition a producer gave a key, computed the way its client does, so a
//! read of the key can go to the worker that owns that partition.

use crate::config::Partitioner;

impl Partitioner {
    /// The partition of `key` among `partitions`; `None` for [`Partitioner::Any`]
    /// or a topic without partitions.
    pub fn partition(self, key: &[u8], partitions: i32) -> Option<i32> {
        let count = u32::try_from(partitions).ok().filter(|&n| n > 0)?;
        let chosen = match self {
            // Kafka's `Utils.toPositive(Utils.murmur2(key)) % partitions`.
            Partitioner::Murmur2 => (murmur2(key) & 0x7fff_ffff) % count,
            // librdkafka's `consistent` and `consistent_random` partitioners.
            Partitioner::Crc32 => crc32(key) % count,
            Partitioner::Any => return None,
        };
        i32::try_from(chosen).ok()
    }
}

/// Kafka's murmur2 (seed `0x9747b28c`), as its Java client hashes keys.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Java's `seed ^ length` on an int: the length wraps like Java's does.
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() >= 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's and librdkafka's `rd_crc32`).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors() {
        // From Kafka's `UtilsTest.testMurmur2` (Java ints).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key) as i32, want, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn partitions_are_in_range_and_any_gives_none() {
        for key in ["order-1", "order-2", "", "ü"] {
            for n in [1, 3, 8] {
                let p = Partitioner::Crc32.partition(key.as_bytes(), n).unwrap();
                assert!((0..n).contains(&p));
                let p = Partitioner::Murmur2.partition(key.as_bytes(), n).unwrap();
                assert!((0..n).contains(&p));
            }
        }
        assert_eq!(Partitioner::Any.partition(b"k", 8), None);
        assert_eq!(Partitioner::Crc32.partition(b"k", 0), None);
    }
}
