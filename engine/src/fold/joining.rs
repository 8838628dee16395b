//! Joining a shared source (see [`super::source`]): a solo loop of a live
//! generation asks to join once it is near the source, and the source's loop
//! adopts the folds waiting to join, rewinding where a newcomer is behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::topic_partition_list::Offset;
use tracing::{info, warn};

use super::consumer::SourceConsumer;
use super::member::Folding;
use super::run::LoopState;
use super::source::Join;
use super::{LoopEnd, LoopError};
use crate::fold_state::RunState;

/// How often a solo loop of a live generation checks whether it can join its
/// topics' shared source.
const JOIN_CHECK_EVERY: Duration = Duration::from_millis(500);

impl LoopState {
    /// A solo loop of a live generation joins its topics' shared source once it
    /// is near it (see [`super::source`]): it commits and ends, and the source
    /// adopts its fold.
    pub(super) fn try_join(&mut self, consumer: &SourceConsumer) -> Result<Option<LoopEnd>, LoopError> {
        let Some(source) = self.joinable.clone() else {
            return Ok(None);
        };
        if self.last_join_check.elapsed() < JOIN_CHECK_EVERY {
            return Ok(None);
        }
        self.last_join_check = Instant::now();
        let member = &mut self.members[0];
        // See `worker::start_folds`: in multi-worker mode a replayed
        // generation stays in its own group.
        let own_group = member.supervisor.is_clustered() && member.fold.generation.number > 1;
        let eligible = !own_group
            && member.fold.is_live()
            && member.replay.is_none()
            && member
                .supervisor
                .replay()
                .is_none_or(|r| !Arc::ptr_eq(&r.fold, &member.fold))
            && matches!(member.fold.state(), RunState::Running)
            && member.fold.is_assigned();
        if !eligible {
            return Ok(None);
        }
        let assignment = consumer.context().assignment.lock().expect("lock").clone();
        let mut positions = BTreeMap::new();
        for partition in assignment {
            let next = member.position(&partition)?;
            positions.insert(partition, next);
        }
        // Committed before asking: once queued, the source may adopt the fold
        // (from its stored offsets) at any moment.
        member.commit(consumer)?;
        let join = source.try_join(&member.supervisor, &member.fold, &positions);
        if join == Join::NotYet {
            return Ok(None);
        }
        info!(projection = %member.supervisor.name, "joining the shared source of {}", source.topics.join(", "));
        Ok(Some(match join {
            Join::Start => LoopEnd::StartSource(source),
            _ => LoopEnd::Joined,
        }))
    }

    /// A shared source adopts the folds waiting to join: each becomes a member
    /// at its own offsets, and where one is behind the consumer the partition is
    /// read again from its offset (the others pass over what they applied).
    pub(super) fn adopt(&mut self, consumer: &SourceConsumer) -> Result<(), LoopError> {
        let Some(source) = self.shared.clone() else {
            return Ok(());
        };
        let context = consumer.context();
        for (supervisor, fold) in source.take_joining() {
            let commands = fold.listen();
            let cache = source.cache_share(self.deps.store_config.state_cache_bytes());
            let mut member = Folding::new(
                supervisor.clone(),
                fold.clone(),
                None,
                commands,
                self.deps.clone(),
                cache,
            )?;
            let assignment = context.assignment.lock().expect("lock").clone();
            let consumed = consumer.position()?;
            let mut rewound = Ok(());
            for partition in &assignment {
                let next = member.position(partition)?;
                let at = consumed
                    .find_partition(&partition.topic, partition.partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(n) => Some(n),
                        _ => None,
                    })
                    .or_else(|| context.started_at.lock().expect("lock").get(partition).copied())
                    .unwrap_or(0);
                if next < at {
                    rewound = consumer.seek(
                        &partition.topic,
                        partition.partition,
                        Offset::Offset(next),
                        Duration::from_secs(5),
                    );
                    if rewound.is_err() {
                        break;
                    }
                    context
                        .started_at
                        .lock()
                        .expect("lock")
                        .insert(partition.clone(), next);
                }
            }
            if let Err(error) = rewound {
                warn!(projection = %supervisor.name, %error, "could not rewind the shared source for a newcomer; it folds on its own");
                fold.hand_on(member.into_commands());
                supervisor.spawn(fold);
                continue;
            }
            context.folds.lock().expect("lock").push(fold.clone());
            fold.own(assignment.iter().cloned());
            if !assignment.is_empty() {
                fold.set_assigned();
            }
            fold.set_state(RunState::Running);
            fold.stop_serving_all();
            fold.start_serving(assignment.iter().cloned());
            fold.set_shared(true);
            info!(projection = %supervisor.name, "joined the shared source of {}", source.topics.join(", "));
            self.members.push(member);
        }
        self.publish(consumer)
    }
}
