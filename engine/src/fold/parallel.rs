//! Folding a large chunk into a shared source's members on two threads.

use rdkafka::message::{BorrowedMessage, Message};

use super::commit::commit_all;
use super::consumer::SourceConsumer;
use super::member::Folding;
use super::run::LoopState;
use super::{LoopEnd, LoopError};
use crate::store::SourcePartition;

/// How each member's fold of a chunk ended (`None`: it folded all of it).
type MemberEnds = Vec<Result<Option<LoopEnd>, LoopError>>;

impl LoopState {
    /// [`LoopState::fold_chunk`] for a shared source with a large chunk: the
    /// members are independent (each its own batch, positions and state), so
    /// two threads fold the whole chunk, each into half of them, in message
    /// order; members that stopped at a message leave afterwards, and the
    /// batches are committed together once the chunk is folded.
    pub(super) fn fold_chunk_in_parallel(
        &mut self,
        consumer: &SourceConsumer,
        messages: &[BorrowedMessage<'_>],
        decoded: &[crate::decode_ahead::Decoded],
    ) -> Result<Option<LoopEnd>, LoopError> {
        let partitions: Vec<SourcePartition> = messages
            .iter()
            .map(|m| SourcePartition {
                topic: self.intern(m.topic()),
                partition: m.partition(),
            })
            .collect();
        let half = self.members.len() / 2;
        let (first, second) = self.members.split_at_mut(half);
        // Each thread also encodes and writes its members' batches when one is
        // due: one WriteBatch per thread, each member's rows and offsets in one of
        // them (invariant 1 per projection), RocksDB inserting both at once.
        let fold_all = |members: &mut [Folding]| -> (MemberEnds, Result<(), LoopError>) {
            let ends: Vec<_> = members
                .iter_mut()
                .map(|member| {
                    for ((message, partition), decoded) in messages.iter().zip(&partitions).zip(decoded) {
                        if let Some(end) = member
                            .fold_message(consumer, message, partition, decoded)?
                            .loop_end()
                        {
                            return Ok(Some(end));
                        }
                    }
                    Ok(None)
                })
                .collect();
            let committed =
                if ends.iter().all(|e| matches!(e, Ok(None))) && members.iter().any(|m| m.is_due(true)) {
                    commit_all(members, consumer)
                } else {
                    Ok(())
                };
            (ends, committed)
        };
        let ((mut ends, first_committed), seconds) = std::thread::scope(|scope| {
            let other = scope.spawn(|| fold_all(second));
            let ends = fold_all(first);
            (ends, other.join())
        });
        let (second_ends, second_committed) =
            seconds.map_err(|panic| LoopError::Thread(crate::panics::message(panic.as_ref())))?;
        ends.extend(second_ends);
        first_committed?;
        second_committed?;
        let mut failure = None;
        for (index, end) in ends.into_iter().enumerate().rev() {
            match end {
                Ok(None) => {}
                Ok(Some(end)) => {
                    if let Some(end) = self.member_ended(consumer, index, end) {
                        return Ok(Some(end));
                    }
                }
                Err(error) => failure = Some(error),
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        if self.members.iter().any(|m| m.is_due(true)) {
            self.commit(consumer)?;
        } else {
            self.publish(consumer)?;
        }
        Ok(None)
    }
}
