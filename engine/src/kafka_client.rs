//! The one place librdkafka client configurations are built: every client of a
//! worker (fold consumers, lag monitor probes, dead-letter producers) starts from
//! the deployment's brokers, sets what its role needs, and applies the raw
//! `librdkafka_options` last, so an operator's setting always wins.

use rdkafka::config::ClientConfig;

use crate::config::KafkaConfig;

/// What a client is for: decides its own settings and which of the raw options
/// apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    /// A fold loop's consumer in this consumer group.
    FoldConsumer {
        /// The generation's consumer group.
        group_id: &'a str,
    },
    /// Metadata and watermark queries only: no group.
    Metadata,
    /// Reads single records by assignment (never joins the group or commits).
    Probe {
        /// A group id (librdkafka assigns only in a consumer that has one).
        group_id: &'a str,
        /// Report the end of a partition (as `PartitionEOF`).
        partition_eof: bool,
    },
    /// A dead-letter producer.
    Producer,
}

/// The configuration of a client for `role`.
pub fn config(kafka: &KafkaConfig, role: Role<'_>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    match role {
        Role::FoldConsumer { group_id } => {
            config
                .set("group.id", group_id)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                // Positions always come from the store (or the beginning); a
                // position outside the log must stop the projection, not silently
                // move it.
                .set("auto.offset.reset", "error")
                .set("partition.assignment.strategy", "cooperative-sticky")
                // librdkafka prefetches up to 100,000 messages per partition by
                // default: with small events and many partitions that is hundreds
                // of MB of queued messages. 10,000 per partition keep the fold fed
                // as long as the fetcher looks again soon after the queue drops
                // below that (its default pause is 1 s, which starved the fold in
                // `make bench`).
                .set("queued.min.messages", "10000")
                .set("fetch.queue.backoff.ms", "10")
                // At the end of the log a fetch waits this long for new data. A
                // broker that answers only when the wait is over (Tansu does) adds
                // it to every live event's delay: librdkafka's 500 ms made the
                // freshness p50 133 ms at 10 events/s, 20 ms made it 10 ms. 50 ms
                // costs an idle worker 20 fetches a second per broker.
                .set("fetch.wait.max.ms", "50");
            if let Some(instance) = &kafka.group_instance_id {
                config.set("group.instance.id", instance);
            }
        }
        Role::Metadata => {}
        Role::Probe {
            group_id,
            partition_eof,
        } => {
            config
                .set("group.id", group_id)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "error");
            if partition_eof {
                config
                    .set("enable.partition.eof", "true")
                    .set("fetch.wait.max.ms", "100");
            }
        }
        Role::Producer => {
            config.set("acks", "all").set("message.timeout.ms", "30000");
        }
    }
    for (key, value) in &kafka.librdkafka_options {
        let applies = match role {
            Role::Producer => !is_consumer_only(key),
            // Metadata and probe clients never join a group.
            Role::Metadata | Role::Probe { .. } => key != "group.id",
            Role::FoldConsumer { .. } => true,
        };
        if applies {
            config.set(key, value);
        }
    }
    if role == Role::Metadata {
        config.remove("group.id");
    }
    config
}

/// Consumer properties from `librdkafka_options` that a producer would warn about.
fn is_consumer_only(key: &str) -> bool {
    matches!(
        key,
        "session.timeout.ms"
            | "heartbeat.interval.ms"
            | "max.poll.interval.ms"
            | "group.instance.id"
            | "auto.offset.reset"
            | "fetch.min.bytes"
            | "fetch.wait.max.ms"
            | "queued.min.messages"
            | "fetch.queue.backoff.ms"
            | "partition.assignment.strategy"
            | "group.protocol"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(options: &[(&str, &str)]) -> KafkaConfig {
        let mut kafka: KafkaConfig =
            serde_json::from_value(serde_json::json!({"brokers": "b:9092"})).unwrap();
        kafka.librdkafka_options = options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        kafka
    }

    #[test]
    fn raw_options_win_where_they_apply() {
        let kafka = kafka(&[
            ("queued.min.messages", "5"),
            ("session.timeout.ms", "6000"),
            ("group.id", "x"),
        ]);
        let consumer = config(&kafka, Role::FoldConsumer { group_id: "g" });
        assert_eq!(consumer.get("queued.min.messages"), Some("5"));
        assert_eq!(consumer.get("auto.offset.reset"), Some("error"));
        assert_eq!(consumer.get("fetch.wait.max.ms"), Some("50"));
        assert_eq!(consumer.get("bootstrap.servers"), Some("b:9092"));
        let producer = config(&kafka, Role::Producer);
        assert_eq!(
            producer.get("session.timeout.ms"),
            None,
            "consumer-only options stay out"
        );
        assert_eq!(producer.get("acks"), Some("all"));
        let metadata = config(&kafka, Role::Metadata);
        assert_eq!(metadata.get("group.id"), None, "no group");
        let probe = config(
            &kafka,
            Role::Probe {
                group_id: "p",
                partition_eof: true,
            },
        );
        assert_eq!(probe.get("group.id"), Some("p"));
        assert_eq!(probe.get("enable.partition.eof"), Some("true"));
    }
}
