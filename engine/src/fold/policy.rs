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
    supervisor: &Supervisor,
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
        .with_label_values(&[&supervisor.name, reason.as_str()])
        .inc();
    match (supervisor.on_poison, dead_letters) {
        (PoisonPolicy::Skip, _) => {
            warn!(topic = %partition.topic, partition = partition.partition, offset, reason = %reason, error = %error,
                "poison event skipped (on_poison = skip): {partition} offset {offset} ({reason}): {error}");
            Ok(Outcome::Applied)
        }
        (PoisonPolicy::DeadLetter, Some(dead_letters)) => {
            match dead_letters.send(message, &supervisor.name, reason, &error, keep_waiting) {
                Ok(()) => {}
                // Nowhere to put it: the event stops the projection, as under `stop`.
                Err(refused) if refused.refused => {
                    let error = format!("{error}; and its dead letter was refused: {refused}");
                    return Ok(stop_at(fold, partition, offset, reason, error));
                }
                Err(failure) => return Err(failure.into()),
            }
            metrics::DEAD_LETTERS.with_label_values(&[&supervisor.name]).inc();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use serde_json::json;

    use super::*;
    use crate::config::{KafkaConfig, ProjectionConfig};
    use crate::projection::{Event, FoldError, PartitionState, Projection};

    struct Nothing;

    impl Projection for Nothing {
        fn apply(&self, _: &Event<'_>, _: &mut dyn PartitionState) -> Result<(), FoldError> {
            Ok(())
        }

        fn merge(
            &self,
            _: &str,
            _: Vec<crate::projection::State>,
        ) -> Result<Option<serde_json::Value>, FoldError> {
            Ok(None)
        }
    }

    /// A mock cluster with topic `in` holding one record with a header.
    fn cluster_with_a_record() -> (
        MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        String,
    ) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("in", 1, 1).unwrap();
        cluster.create_topic("dlt", 1, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "trace",
            value: Some("t-1"),
        });
        producer
            .send(
                BaseRecord::to("in")
                    .key("k")
                    .payload(&[0xde, 0xad][..])
                    .headers(headers),
            )
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
        (cluster, brokers)
    }

    fn consumer_at(brokers: &str, topic: &str) -> BaseConsumer {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "policy-test")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
        consumer
    }

    fn first_message(consumer: &BaseConsumer) -> rdkafka::message::BorrowedMessage<'_> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                return message;
            }
        }
        panic!("no message within 20 s")
    }

    /// A projection named after its test (the metrics are process-wide).
    fn supervisor(name: &str, policy: &str) -> Supervisor {
        let config: ProjectionConfig =
            serde_json::from_value(json!({"name": name, "kind": "k", "topics": ["in"],
            "on_poison": policy, "dead_letter_topic": "dlt"}))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), false).unwrap();
        let live = Fold::new(
            store.live_generation(name).unwrap(),
            Arc::new(Nothing),
            vec![],
            true,
        );
        Supervisor::new(&config, Arc::new(Nothing), live, None)
    }

    fn poisoned(
        supervisor: &Supervisor,
        dead_letters: Option<&DeadLetters>,
        message: &BorrowedMessage<'_>,
    ) -> Outcome {
        let fold = supervisor.live();
        let partition = SourcePartition {
            topic: "in".into(),
            partition: 0,
        };
        let poison = Poison {
            message,
            partition: &partition,
            reason: PoisonReason::DecodeFailed,
            error: "bad body".into(),
        };
        handle(supervisor, &fold, dead_letters, poison, &|| true).unwrap()
    }

    fn count(name: &str, reason: &str) -> u64 {
        metrics::POISON_EVENTS.with_label_values(&[name, reason]).get()
    }

    #[test]
    fn stop_halts_at_the_event_and_skip_passes_it_counted() {
        let (_cluster, brokers) = cluster_with_a_record();
        let consumer = consumer_at(&brokers, "in");
        let message = first_message(&consumer);

        let stop = supervisor("stop-test", "stop");
        let before = count("stop-test", "decode_failed");
        assert!(matches!(poisoned(&stop, None, &message), Outcome::Halt));
        assert_eq!(
            stop.live().state(),
            RunState::Poisoned {
                topic: "in".into(),
                partition: 0,
                offset: message.offset(),
                reason: PoisonReason::DecodeFailed,
                error: "bad body".into(),
            }
        );
        let skip = supervisor("skip-test", "skip");
        assert!(matches!(poisoned(&skip, None, &message), Outcome::Applied));
        assert_eq!(skip.live().state(), RunState::Starting, "skip changes no state");
        assert_eq!(count("stop-test", "decode_failed"), before + 1, "counted");
        assert_eq!(count("skip-test", "decode_failed"), 1, "counted");
    }

    #[test]
    fn dead_letter_writes_the_original_bytes_with_the_reason_in_headers() {
        let (_cluster, brokers) = cluster_with_a_record();
        let consumer = consumer_at(&brokers, "in");
        let message = first_message(&consumer);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let kafka: KafkaConfig = serde_json::from_value(json!({"brokers": brokers})).unwrap();
        let dead_letters = DeadLetters::new(&kafka, "dlt", runtime.handle().clone()).unwrap();
        let projection = supervisor("dlt-test", "dead_letter");
        assert!(matches!(
            poisoned(&projection, Some(&dead_letters), &message),
            Outcome::Applied
        ));
        let reader = consumer_at(&brokers, "dlt");
        let letter = first_message(&reader);
        assert_eq!(letter.payload(), Some(&[0xde, 0xad][..]), "the original bytes");
        assert_eq!(letter.key(), Some(&b"k"[..]));
        let headers: std::collections::BTreeMap<String, String> = letter
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                        (h.key.to_owned(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(headers["trace"], "t-1", "the original headers are kept");
        assert_eq!(headers["projector.reason"], "decode_failed");
        assert_eq!(headers["projector.error"], "bad body");
        assert_eq!(headers["projector.source.topic"], "in");
        assert_eq!(headers["projector.source.offset"], message.offset().to_string());
        assert_eq!(headers["projector.projection"], "dlt-test");
        assert_eq!(metrics::DEAD_LETTERS.with_label_values(&["dlt-test"]).get(), 1);
    }
}
