//! The dead-letter topic: poison events, byte for byte, with why in the headers.

use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tracing::warn;

use crate::backoff::Backoff;
use crate::config::KafkaConfig;
use crate::kafka_client::Role;
use crate::poison::PoisonReason;

/// A producer to one projection's dead-letter topic.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    runtime: tokio::runtime::Handle,
}

/// Why a dead letter was not written.
#[derive(Debug, thiserror::Error)]
#[error("dead letter to {topic} not acknowledged: {error}")]
pub struct DeadLetterError {
    topic: String,
    error: String,
    /// The producer or broker refuses this record for good (too large): retrying
    /// cannot help.
    pub refused: bool,
}

/// Errors no retry of the same record can get past.
fn refused_for_good(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{
        InvalidMessageSize, InvalidRecord, MessageBatchTooLarge, MessageSizeTooLarge,
    };
    matches!(
        error.rdkafka_error_code(),
        Some(MessageSizeTooLarge | MessageBatchTooLarge | InvalidMessageSize | InvalidRecord)
    )
}

impl DeadLetters {
    /// A producer to `topic` with the deployment's Kafka settings.
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        Ok(DeadLetters {
            producer: crate::kafka_client::config(kafka, Role::Producer).create()?,
            topic: topic.to_owned(),
            runtime,
        })
    }

    /// Writes `message` (original key, value and headers) with the `projector.*`
    /// headers, and waits for the broker's acknowledgement, retrying with backoff
    /// until it comes or `keep_waiting` says stop. A record refused for good (too
    /// large for the producer or the dead-letter topic) is not retried.
    pub fn send(
        &self,
        message: &BorrowedMessage<'_>,
        projection: &str,
        reason: PoisonReason,
        error: &str,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<(), DeadLetterError> {
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        for (key, value) in [
            ("projector.reason", reason.as_str()),
            ("projector.error", error),
            ("projector.source.topic", message.topic()),
            ("projector.source.partition", partition.as_str()),
            ("projector.source.offset", offset.as_str()),
            ("projector.projection", projection),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(value) = message.payload() {
                record = record.payload(value);
            }
            let outcome = self.runtime.block_on(
                self.producer
                    .send(record, Timeout::After(Duration::from_secs(30))),
            );
            let (failure, refused) = match outcome {
                Ok(_) => return Ok(()),
                Err((e, _)) => (e.to_string(), refused_for_good(&e)),
            };
            if refused || !keep_waiting() {
                return Err(DeadLetterError {
                    topic: self.topic.clone(),
                    error: failure,
                    refused,
                });
            }
            warn!(topic = %self.topic, error = %failure, "dead letter not acknowledged; retrying");
            std::thread::sleep(backoff.next_delay());
        }
    }
}
