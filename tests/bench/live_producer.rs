//! The live phase's producer. Confluent's Python client serializes the order
//! events once (registering their schemas, Confluent framing) onto a seed topic
//! and records the bytes; this producer, rdkafka in the bench's own process,
//! sends those records again to the live topic at a steady rate. Python at 50,000
//! events/s takes most of a core, which on a 2-core machine starved the worker it
//! was measuring; this costs a fraction of that.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use serde_json::Value;

/// One recorded record: key and Confluent-framed Avro value.
pub struct Recorded {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

/// The records `produce.py --record FILE` wrote.
pub fn read_recorded(file: &Path) -> Result<Vec<Recorded>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .enumerate()
        .map(|(number, line)| {
            let record: Value = serde_json::from_str(line)?;
            let hex =
                |field: &str| -> Result<Option<Vec<u8>>> { record[field].as_str().map(from_hex).transpose() };
            Ok(Recorded {
                key: hex("key_hex")?,
                value: hex("value_hex")?.with_context(|| format!("line {}: no value", number + 1))?,
            })
        })
        .collect()
}

fn from_hex(text: &str) -> Result<Vec<u8>> {
    ensure!(text.len() % 2 == 0, "odd-length hex");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("not hex"))
        .collect()
}

/// Sends `records` round and round to `topic` at `rate` records per second for
/// `seconds`; each record's timestamp is its send time. Returns how many were
/// sent, after every one is acknowledged.
pub fn produce_steadily(
    brokers: &str,
    topic: &str,
    records: &[Recorded],
    rate: u32,
    seconds: u32,
) -> Result<u64> {
    ensure!(!records.is_empty() && rate > 0, "nothing to send");
    // librdkafka's delivery reports are served by the producer's own thread.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("enable.idempotence", "false")
        .create()?;
    let started = Instant::now();
    let until = Duration::from_secs(u64::from(seconds));
    let mut sent: u64 = 0;
    let mut next = records.iter().cycle();
    loop {
        let elapsed = started.elapsed();
        if elapsed >= until {
            break;
        }
        let due = (elapsed.as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            let record = next.next().context("cycle never ends")?;
            let mut message = BaseRecord::<[u8], [u8]>::to(topic).payload(&record.value);
            if let Some(key) = &record.key {
                message = message.key(key);
            }
            match producer.send(message) {
                Ok(()) => sent += 1,
                Err((e, _))
                    if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(sent)
}
