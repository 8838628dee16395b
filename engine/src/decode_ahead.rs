//! Decoding a chunk of messages ahead of the fold, on a thread of its own.
//!
//! Decoding and upcasting depend on nothing but a message's bytes (and the
//! registry), so they can run while the fold loop folds the chunk polled before.
//! The fold loop still takes every decision in message order: positions, the
//! poison policy, batches and commits. On two cores this takes about a quarter of
//! the loop's work off its thread (see the README's Performance section).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use crate::decode::{DecodeError, Decoder};
use crate::schemas::CurrentEvent;

/// What decoding one message gave.
pub type Decoded = Result<DecodedMessage, DecodeError>;

/// One message, decoded.
#[derive(Debug)]
pub struct DecodedMessage {
    /// Its events in their current versions.
    pub events: Vec<CurrentEvent>,
    /// Its key as text (see [`Decoder::decode_key`]).
    pub key: Option<Arc<str>>,
}

/// The values and keys of one chunk, copied out of the consumer's buffers into
/// one allocation.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    /// Each message's value and key; `None` for a message without one.
    messages: Vec<MessageBytes>,
}

/// Where one message's value and key are in a chunk's bytes.
type MessageBytes = (Option<Range<usize>>, Option<Range<usize>>);

impl Chunk {
    fn push(&mut self, bytes: Option<&[u8]>) -> Option<Range<usize>> {
        bytes.map(|b| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(b);
            start..self.bytes.len()
        })
    }
}

/// A decoder running on its own thread, one chunk ahead of the fold loop.
pub struct DecodeAhead {
    chunks: SyncSender<Chunk>,
    decoded: Receiver<Vec<Decoded>>,
    /// Folded chunks going back to be dropped where they were allocated.
    recycled: SyncSender<Vec<Decoded>>,
    /// Ends a wait for the registry once the fold loop has gone.
    cancelled: Arc<AtomicBool>,
}

/// The decoding thread ended (it panicked): nothing more can be decoded.
#[derive(Debug, thiserror::Error)]
#[error("the decoding thread of this projection ended unexpectedly")]
pub struct DecoderGone;

impl DecodeAhead {
    /// Starts the thread `name`, decoding with `decoder`; a wait for the registry
    /// gives up when `shutdown` is set.
    pub fn start(decoder: Decoder, name: String, shutdown: Arc<AtomicBool>) -> std::io::Result<Self> {
        // One chunk decoding and one waiting is all the fold loop ever has out.
        let (chunks, chunk_inbox) = sync_channel::<Chunk>(2);
        let (decoded_outbox, decoded) = sync_channel(2);
        let (recycled, recycle_inbox) = sync_channel::<Vec<Decoded>>(4);
        let cancelled = Arc::new(AtomicBool::new(false));
        let stop = cancelled.clone();
        std::thread::Builder::new().name(name).spawn(move || {
            let mut decoder = decoder;
            let keep_waiting = || !shutdown.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed);
            for chunk in chunk_inbox {
                let results = chunk
                    .messages
                    .iter()
                    .map(|(value, key)| {
                        let value = value.as_ref().map(|r| &chunk.bytes[r.clone()]);
                        let key = key.as_ref().map(|r| &chunk.bytes[r.clone()]);
                        let events = decoder.decode(value, &keep_waiting)?;
                        let key = decoder.decode_key(key, &keep_waiting)?;
                        Ok(DecodedMessage { events, key })
                    })
                    .collect();
                if decoded_outbox.send(results).is_err() {
                    return;
                }
                while let Ok(folded) = recycle_inbox.try_recv() {
                    drop(folded);
                }
            }
        })?;
        Ok(DecodeAhead {
            chunks,
            decoded,
            recycled,
            cancelled,
        })
    }

    /// Queues the values and keys of a chunk of messages for decoding, in message
    /// order. `None` for a message without a value (or one the loop will not
    /// decode), or without a key.
    pub fn submit<'v>(
        &self,
        messages: impl Iterator<Item = (Option<&'v [u8]>, Option<&'v [u8]>)>,
    ) -> Result<(), DecoderGone> {
        let mut chunk = Chunk::default();
        for (value, key) in messages {
            let value = chunk.push(value);
            let key = chunk.push(key);
            chunk.messages.push((value, key));
        }
        self.chunks.send(chunk).map_err(|_| DecoderGone)
    }

    /// What the oldest submitted chunk decoded to, one entry per message; waits for
    /// it.
    pub fn next(&self) -> Result<Vec<Decoded>, DecoderGone> {
        self.decoded.recv().map_err(|_| DecoderGone)
    }
}

impl DecodeAhead {
    /// Hands a folded chunk back to the decoding thread to be dropped there:
    /// its values were allocated on that thread, where freeing them is cheaper
    /// than on the fold loop's (a tenth of the loop's time went to freeing them),
    /// and the fold loop is the busier of the two. Dropped here when the thread
    /// is behind with them.
    pub fn recycle(&self, folded: Vec<Decoded>) {
        let _ = self.recycled.try_send(folded);
    }
}

impl Drop for DecodeAhead {
    fn drop(&mut self) {
        // The thread ends when it finds the channel closed, or its registry wait
        // gives up.
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::RegistryConfig;
    use crate::poison::PoisonReason;
    use crate::registry_client::RegistryClient;
    use crate::schemas::SchemaSet;

    /// A decode-ahead thread whose registry is a closed loopback port.
    fn unreachable_registry(runtime: &tokio::runtime::Runtime, shutdown: Arc<AtomicBool>) -> DecodeAhead {
        let config = RegistryConfig {
            url: "http://127.0.0.1:1".into(),
            username: None,
            password: None,
            timeout_ms: 200,
            max_backoff_ms: 50,
        };
        let registry = Arc::new(RegistryClient::new(&config, runtime.handle().clone()).unwrap());
        let decoder = Decoder::new(registry, Arc::new(SchemaSet::default()));
        DecodeAhead::start(decoder, "decode-test".into(), shutdown).unwrap()
    }

    fn reason(decoded: &Decoded) -> Option<PoisonReason> {
        match decoded {
            Err(DecodeError::Poison { reason, .. }) => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn results_come_back_per_chunk_in_message_order() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ahead = unreachable_registry(&runtime, Arc::new(AtomicBool::new(false)));
        let values: [Option<&[u8]>; 3] = [Some(&[0, 0]), None, Some(&[9, 0, 0, 0, 1, 2])];
        ahead.submit(values.into_iter().map(|v| (v, None))).unwrap();
        ahead.submit([(Some(&[7u8][..]), None)].into_iter()).unwrap();
        let first = ahead.next().unwrap();
        assert_eq!(first.len(), 3);
        for (decoded, expected) in first.iter().zip(["shorter than", "null value", "magic byte"]) {
            assert_eq!(reason(decoded), Some(PoisonReason::BadFrame));
            let Err(DecodeError::Poison { message, .. }) = decoded else {
                unreachable!()
            };
            assert!(message.contains(expected), "{message} should say {expected}");
        }
        let second = ahead.next().unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(reason(&second[0]), Some(PoisonReason::BadFrame));
    }

    #[test]
    fn a_registry_wait_ends_at_shutdown_as_interrupted() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let shutdown = Arc::new(AtomicBool::new(false));
        let ahead = unreachable_registry(&runtime, shutdown.clone());
        // Magic byte, schema id 1, an empty body: needs the registry.
        ahead
            .submit([(Some(&[0u8, 0, 0, 0, 1][..]), None)].into_iter())
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        shutdown.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let decoded = ahead.next().unwrap();
        assert!(
            matches!(decoded[0], Err(DecodeError::Interrupted(_))),
            "{:?}",
            decoded[0]
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
