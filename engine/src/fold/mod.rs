//! The fold loop of one generation of a projection: consume, decode, fold, commit.
//!
//! Each projection has its own consumer group and its own thread per generation.
//! The loop keeps a write-back cache of the keys a batch touched ([`batch`]) and
//! commits the batch as one RocksDB write with the next offset of every partition
//! it read. Offsets in RocksDB are the truth: on assignment the consumer starts
//! from them ([`consumer`]), and a message below the next offset of its partition
//! (a redelivery) is dropped, so nothing is applied twice.
//!
//! Messages are polled in chunks; while one chunk is folded, the next is decoded
//! on a second thread ([`crate::decode_ahead`]). A rebalance or a consumer error is
//! handled only after every message polled before it has been folded ([`run`]).
//! Events that cannot be decoded or folded go through the poison policy
//! ([`policy`]).
//!
//! What the loop does with a failure depends only on its class, never on its
//! text: a bad event (a `Stop::Poison` from decoding or folding, or a panic in a
//! fold, which is refolded and then poison) goes through the projection's policy;
//! a wait that shutdown interrupts (`Stop::Interrupted`) leaves the message for the
//! next run; a store that refuses writes with an I/O error is transient and
//! waited out with backoff (`store_unavailable`); anything else ([`LoopError`],
//! including a state row the store cannot read) is fatal: the loop ends and the
//! projection is `failed`, naming the error, until `resume`.
//!
//! A loop folds one generation ([`Fold`]) and takes commands from its
//! projection's [`Supervisor`]; a replay's loop folds up to the target of a
//! handover, switches, and then goes on as the live loop.

mod batch;
mod commit;
mod consumer;
mod dedup;
mod facts;
mod joining;
mod member;
mod message;
mod parallel;
mod partitions;
mod policy;
mod run;
mod source;
mod state_cache;

pub use source::{SharedSource, JOIN_DISTANCE};

/// Chunks of at least this many messages are folded into a shared source's
/// members on two threads (fewer: the thread costs more than it saves).
const PARALLEL_CHUNK: usize = 64;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::error::KafkaError;
use tracing::{error, info_span};

use crate::config::{KafkaConfig, ReplayConfig, StoreConfig};
use crate::decode::Decoder;
use crate::decode_ahead::DecoderGone;
use crate::fold_state::{Fold, RunState};
use crate::store::{Store, StoreError};
use crate::supervisor::Supervisor;

/// What the fold loop needs besides its projection.
#[derive(Clone)]
pub struct SourceDeps {
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// Batch settings.
    pub store_config: StoreConfig,
    /// Replay settings.
    pub replay_config: ReplayConfig,
    /// The worker's database.
    pub store: Arc<Store>,
    /// Set to stop: the loop commits its batch and leaves the group.
    pub shutdown: Arc<AtomicBool>,
    /// For the blocking calls of async clients (registry, dead-letter producer).
    pub async_runtime: tokio::runtime::Handle,
    /// The shared sources, by their sorted topics.
    pub sources: Arc<BTreeMap<Vec<String>, Arc<SharedSource>>>,
}

impl SourceDeps {
    /// The shared source of `topics`, if their projections share one.
    fn source_of(&self, topics: &[String]) -> Option<Arc<SharedSource>> {
        let mut sorted = topics.to_vec();
        sorted.sort();
        self.sources.get(&sorted).cloned()
    }
}

/// Starts the fold loop of one generation of `projection` on its own thread (the
/// caller has marked the fold's loop as running).
pub fn spawn(
    projection: Arc<Supervisor>,
    fold: Arc<Fold>,
    decoder: Decoder,
    deps: SourceDeps,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("fold-{}", fold.generation.column_family()))
        .spawn(move || {
            let span =
                info_span!("projection", projection = %projection.name, generation = fold.generation.number);
            let _entered = span.enter();
            let replay = projection.replay().filter(|r| Arc::ptr_eq(&r.fold, &fold));
            let commands = fold.listen();
            let (store, shutdown) = (deps.store.clone(), deps.shutdown.clone());
            // Whatever ends the loop, the projection says so: a panic in the engine
            // itself is a failure like any other, never a thread gone quietly.
            let outcome = crate::panics::contained(|| {
                let mut fold_loop =
                    run::FoldLoop::solo(projection.clone(), fold.clone(), replay, commands, decoder, deps)?;
                let end = fold_loop.run()?;
                let commands = fold_loop.into_members().pop().map(member::Folding::into_commands);
                Ok::<_, LoopError>((end, commands))
            });
            let shutting_down = shutdown.load(Ordering::Relaxed);
            let failure = match outcome {
                Ok(Ok((LoopEnd::Stopped, _))) => None,
                Ok(Ok((
                    end @ (LoopEnd::Refold | LoopEnd::Joined | LoopEnd::StartSource(_)),
                    Some(commands),
                ))) if !shutting_down => {
                    // The fold goes on in another loop, which takes its commands:
                    // after a panic, a new loop of its own folds again from the
                    // stored offsets and applies the poison policy to the event
                    // that panicked (see `Fold::remember_panic`); after a join,
                    // the shared source adopts it.
                    fold.hand_on(commands);
                    // The next loop's assignment says what it serves (a source
                    // that adopts a joining fold replaces it itself, maybe already).
                    match end {
                        LoopEnd::Refold => {
                            fold.stop_serving_all();
                            projection.spawn(fold.clone())
                        }
                        LoopEnd::StartSource(source) => {
                            fold.stop_serving_all();
                            source.start(vec![(projection.clone(), fold.clone())])
                        }
                        _ => {}
                    }
                    return;
                }
                Ok(Ok(_)) => None,
                Ok(Err(failure)) => Some(failure.to_string()),
                Err(panic) => Some(format!("the fold loop {panic}")),
            };
            if let Some(failure) = failure {
                error!(error = %failure, "fold loop stopped");
                fold.set_state(RunState::Failed { error: failure });
            }
            projection.loop_exited(&fold, &store, shutting_down);
        })
        .expect("spawning a thread")
}

/// Starts the loop of the shared source `source` on its own thread, folding
/// `members` (their loops marked as running by [`SharedSource::start`]).
pub fn spawn_source(
    source: Arc<SharedSource>,
    members: Vec<(Arc<Supervisor>, Arc<Fold>)>,
    decoder: Decoder,
    deps: SourceDeps,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("source-{}", source.topics.join("+")))
        .spawn(move || {
            let span = info_span!("source", topics = %source.topics.join(","));
            let _entered = span.enter();
            let (store, shutdown) = (deps.store.clone(), deps.shutdown.clone());
            let mut folds: Vec<(Arc<Supervisor>, Arc<Fold>)> = members.clone();
            let outcome = crate::panics::contained(|| {
                let mut fold_loop = run::FoldLoop::shared(source.clone(), members, decoder, deps)?;
                let end = fold_loop.run();
                // Those that left were handled by the loop; these are still in it.
                folds = fold_loop
                    .into_members()
                    .into_iter()
                    .map(|m| (m.supervisor.clone(), m.fold.clone()))
                    .collect();
                end
            });
            let shutting_down = shutdown.load(Ordering::Relaxed);
            let failure = match outcome {
                Ok(Ok(_)) => None,
                Ok(Err(failure)) => Some(failure.to_string()),
                Err(panic) => Some(format!("the shared source's loop {panic}")),
            };
            if let Some(failure) = &failure {
                error!(error = %failure, "shared source stopped");
            }
            for (projection, fold) in folds {
                fold.set_shared(false);
                if let Some(failure) = &failure {
                    fold.set_state(RunState::Failed {
                        error: failure.clone(),
                    });
                }
                projection.loop_exited(&fold, &store, shutting_down);
            }
            // Folds that asked to join meanwhile fold on their own (and start the
            // source again when they join).
            for (projection, fold) in source.ended() {
                if shutting_down {
                    projection.loop_exited(&fold, &store, true);
                } else {
                    projection.spawn(fold);
                }
            }
        })
        .expect("spawning a thread")
}

/// How a fold loop ended without an error.
enum LoopEnd {
    /// Stopped (shutdown, handover, poison under `stop`, operator).
    Stopped,
    /// A fold panicked; its open batch was dropped unwritten and the loop must
    /// start over from the stored offsets.
    Refold,
    /// A solo loop's fold joined its topics' shared source, which adopts it.
    Joined,
    /// A solo loop's fold found no shared source running: it starts one.
    StartSource(Arc<SharedSource>),
}

/// Why the loop ended abnormally.
#[derive(Debug, thiserror::Error)]
enum LoopError {
    #[error(transparent)]
    DeadLetter(#[from] crate::dead_letter::DeadLetterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("partition assignment failed: {0}")]
    Assignment(String),
    #[error(
        "shut down while the store refused writes: the open batch of {events} events was not \
             written and will be folded again from the stored offsets ({error})"
    )]
    UnwrittenAtShutdown { events: u64, error: StoreError },
    #[error("starting the decoding thread: {0}")]
    DecoderThread(std::io::Error),
    #[error(transparent)]
    DecoderGone(#[from] DecoderGone),
    #[error(transparent)]
    Encode(#[from] batch::EncodeError),
    #[error("the projection's configuration: {0}")]
    Config(String),
    #[error("a thread folding a shared source's members {0}")]
    Thread(String),
}
