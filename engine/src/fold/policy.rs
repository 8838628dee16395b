//! The poison policy (DESIGN.md invariant 4): what happens to an event that
//! cannot be decoded, upcast or folded. Every occurrence is counted and logged
//! with its topic, partition and offset here, in one place.

use rdkafka::message::{BorrowedMessage, Message};
use tracing::{error, warn};

use super::LoopError;
use crate::config::PoisonPolicy;
use crate::dead_letter::DeadLetters;
use crate::fold_state::{Fold, RunState};
use crate::metrics;
use crate::poison::PoisonReason;
use crate::store::SourcePartition;
use crate::supervisor::Supervisor;

/// What the loop does with a message after trying it.
pub(super) enum Outcome {
    /// Folded (or skipped by policy): the offset moves past it.
    Applied,
    /// Stop here (policy `stop`); nothing at or after it is committed.
    Halt,
    /// Shutting down mid-message (waiting for the registry or a dead-letter
    /// acknowledgement); the message is left for the next run.
    Retry,
}

/// One poison event: where it is and what is wrong with it.
pub(super) struct Poison<'m, 'c> {
    pub(super) message: &'m BorrowedMessage<'c>,
    pub(super) partition: &'m SourcePartition,
    pub(super) reason: PoisonReason,
    pub(super) error: String,
}

/// Applies the projection's poison policy to one event; counts and logs it.
/// `keep_waiting` says whether a dead letter may still wait for the broker.
pub(super) fn handle(
    runtime: &Supervisor,
    fold: &Fold,
    dead_letters: Option<&DeadLetters>,
    poison: Poison<'_, '_>,
    keep_waiting: &dyn Fn() -> bool,
) -> Result<Outcome, LoopError> {
    let Poison {
        message,
        partition,
        reason,
        error,
    } = poison;
    let offset = message.offset();
    metrics::POISON_EVENTS
        .with_label_values(&[&runtime.name, reason.as_str()])
        .inc();
    match (runtime.on_poison, dead_letters) {
        (PoisonPolicy::Skip, _) => {
            warn!(topic = %partition.topic, partition = partition.partition, offset, reason = %reason, error = %error,
                "poison event skipped (on_poison = skip): {partition} offset {offset} ({reason}): {error}");
            Ok(Outcome::Applied)
        }
        (PoisonPolicy::DeadLetter, Some(dead_letters)) => {
            match dead_letters.send(message, &runtime.name, reason, &error, keep_waiting) {
                Ok(()) => {}
                // Nowhere to put it: the event stops the projection, as under `stop`.
                Err(refused) if refused.refused => {
                    let error = format!("{error}; and its dead letter was refused: {refused}");
                    return Ok(stop_at(fold, partition, offset, reason, error));
                }
                Err(failure) => return Err(failure.into()),
            }
            metrics::DEAD_LETTERS.with_label_values(&[&runtime.name]).inc();
            warn!(topic = %partition.topic, partition = partition.partition, offset, reason = %reason, error = %error,
                "poison event dead-lettered: {partition} offset {offset} ({reason}): {error}");
            Ok(Outcome::Applied)
        }
        _ => Ok(stop_at(fold, partition, offset, reason, error)),
    }
}

/// Stops the projection at a poison event (policy `stop`, or a dead letter with
/// nowhere to go).
fn stop_at(
    fold: &Fold,
    partition: &SourcePartition,
    offset: i64,
    reason: PoisonReason,
    error: String,
) -> Outcome {
    error!(
        topic = %partition.topic,
        partition = partition.partition,
        offset,
        reason = %reason,
        error = %error,
        "poison event: projection stopped at {partition} offset {offset} ({reason}): {error}"
    );
    fold.set_state(RunState::Poisoned {
        topic: partition.topic.to_string(),
        partition: partition.partition,
        offset,
        reason,
        error,
    });
    Outcome::Halt
}
