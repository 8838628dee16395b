//! Every Prometheus metric Projector exports, in one place.
//!
//! Names follow `projector_<what>_<unit>[_total]`; labels come from a small fixed
//! set, never from error text. The fold loop counts in locals and publishes once
//! per batch.

use std::sync::LazyLock;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    REGISTRY
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

/// `projector_events_applied_total{projection}`
pub static EVENTS_APPLIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_events_applied_total",
                "Events folded into a projection and committed.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_poison_events_total{projection,reason}`
pub static POISON_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_poison_events_total",
                "Events that could not be decoded, upcast or folded.",
            ),
            &["projection", "reason"],
        )
        .expect("valid metric"),
    )
});

/// `projector_dead_letters_total{projection}`
pub static DEAD_LETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_dead_letters_total",
                "Poison events written to the dead-letter topic and acknowledged.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_duplicate_events_total{projection}`
pub static DUPLICATE_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_duplicate_events_total",
                "Events not folded because their id was folded before (`dedup`), committed by the live generation.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_events_without_id_total{projection}`
pub static EVENTS_WITHOUT_ID: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_events_without_id_total",
                "Events of a projection with `dedup` that had no id (header missing, expression null): folded.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_operator_skips_total{projection}`
pub static OPERATOR_SKIPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_operator_skips_total",
                "Poison events skipped on an operator's request (POST .../skip).",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_store_write_failures_total{projection}`
pub static STORE_WRITE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_store_write_failures_total",
                "Batch writes RocksDB refused (disk full, I/O error); the batch is retried, offsets wait.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_upcasts_total{event,from_version,to_version}`
pub static UPCASTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_upcasts_total",
                "Upcaster steps applied, by source event type and versions.",
            ),
            &["event", "from_version", "to_version"],
        )
        .expect("valid metric"),
    )
});

/// `projector_schema_registry_requests_total{outcome}`
pub static REGISTRY_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_schema_registry_requests_total",
                "Schema registry lookups by outcome (ok, not_found, error).",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

/// `projector_http_connections_total{outcome}`
pub static HTTP_CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "projector_http_connections_total",
                "HTTP connections by outcome: accepted, refused (every connection was answering a request), \
                 evicted (closed at the cap to make room), timed_out (header or idle timeout), accept_error.",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

/// `projector_consumer_lag_events{projection,topic,partition}`
pub static CONSUMER_LAG_EVENTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "projector_consumer_lag_events",
                "High watermark minus the next offset to apply (offsets stored with state).",
            ),
            &["projection", "topic", "partition"],
        )
        .expect("valid metric"),
    )
});

/// `projector_consumer_lag_seconds{projection,topic,partition}`
pub static CONSUMER_LAG_SECONDS: LazyLock<GaugeVec> = LazyLock::new(|| {
    register(
        GaugeVec::new(
            Opts::new(
                "projector_consumer_lag_seconds",
                "Age of the oldest event not yet applied; 0 when caught up.",
            ),
            &["projection", "topic", "partition"],
        )
        .expect("valid metric"),
    )
});

/// `projector_projection_up{projection}`
pub static PROJECTION_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "projector_projection_up",
                "1 while the projection's fold loop runs; 0 when stopped on a poison event or a failure.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_restoring_partitions{projection}`
pub static RESTORING_PARTITIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "projector_restoring_partitions",
                "Partitions this worker gained and still folds up to the high watermark seen after the gain \
                 (multi-worker mode); their reads get 503 until done.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_restore_remaining_events{projection}`
pub static RESTORE_REMAINING_EVENTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "projector_restore_remaining_events",
                "Events the restoring partitions still have to fold before they are served (multi-worker mode).",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_last_progress_timestamp_seconds{projection}`
pub static LAST_PROGRESS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "projector_last_progress_timestamp_seconds",
                "Unix time of the projection's last committed batch.",
            ),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_batch_commit_seconds`
pub static BATCH_COMMIT_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "projector_batch_commit_seconds",
                "Time to write one batch (state and offsets) to RocksDB.",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets")),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_event_freshness_seconds{projection}`
pub static EVENT_FRESHNESS_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "projector_event_freshness_seconds",
                "Time from an event's record timestamp to the commit of the batch that applied it \
                 (live generations only).",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["projection"],
        )
        .expect("valid metric"),
    )
});

/// `projector_batch_events`
pub static BATCH_EVENTS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new("projector_batch_events", "Events per committed batch.")
                .buckets(prometheus::exponential_buckets(1.0, 4.0, 9).expect("valid buckets")),
        )
        .expect("valid metric"),
    )
});

fn replay_gauge(name: &str, help: &str) -> GaugeVec {
    register(GaugeVec::new(Opts::new(name, help), &["projection", "generation"]).expect("valid metric"))
}

/// `projector_replay_progress_ratio{projection,generation}`
pub static REPLAY_PROGRESS_RATIO: LazyLock<GaugeVec> = LazyLock::new(|| {
    replay_gauge(
        "projector_replay_progress_ratio",
        "Share of the source partitions' events a replay has folded (1 once switched).",
    )
});

/// `projector_replay_events_per_second{projection,generation}`
pub static REPLAY_EVENTS_PER_SECOND: LazyLock<GaugeVec> = LazyLock::new(|| {
    replay_gauge(
        "projector_replay_events_per_second",
        "Recent fold rate of a replay.",
    )
});

/// `projector_replay_eta_seconds{projection,generation}`
pub static REPLAY_ETA_SECONDS: LazyLock<GaugeVec> = LazyLock::new(|| {
    replay_gauge(
        "projector_replay_eta_seconds",
        "Time a replay needs to catch up at its recent rate; -1 while unknown.",
    )
});

/// Counts one schema registry request.
pub fn registry_request(outcome: &str) {
    REGISTRY_REQUESTS.with_label_values(&[outcome]).inc();
}

/// Counts an HTTP connection's outcome (see [`HTTP_CONNECTIONS`]).
pub fn http_connection(outcome: &str) {
    HTTP_CONNECTIONS.with_label_values(&[outcome]).inc();
}

/// Every metric, for `init` and `names`.
fn all() -> Vec<&'static dyn prometheus::core::Collector> {
    vec![
        &*EVENTS_APPLIED,
        &*REPLAY_PROGRESS_RATIO,
        &*REPLAY_EVENTS_PER_SECOND,
        &*REPLAY_ETA_SECONDS,
        &*POISON_EVENTS,
        &*DEAD_LETTERS,
        &*OPERATOR_SKIPS,
        &*DUPLICATE_EVENTS,
        &*EVENTS_WITHOUT_ID,
        &*UPCASTS,
        &*REGISTRY_REQUESTS,
        &*HTTP_CONNECTIONS,
        &*CONSUMER_LAG_EVENTS,
        &*CONSUMER_LAG_SECONDS,
        &*PROJECTION_UP,
        &*RESTORING_PARTITIONS,
        &*RESTORE_REMAINING_EVENTS,
        &*LAST_PROGRESS,
        &*BATCH_COMMIT_SECONDS,
        &*BATCH_EVENTS,
        &*EVENT_FRESHNESS_SECONDS,
    ]
}

/// Registers every metric, so each is in the registry before its first sample.
pub fn init() {
    all();
}

/// The name of every metric Projector exports.
pub fn names() -> Vec<String> {
    all()
        .iter()
        .flat_map(|c| c.desc())
        .map(|d| d.fq_name.clone())
        .collect()
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut buffer)
        .expect("text encoding into memory cannot fail");
    String::from_utf8(buffer).expect("Prometheus text format is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::names;

    /// Every query of the Grafana dashboard in `config/` names a metric we export.
    #[test]
    fn the_dashboard_uses_only_exported_metrics() {
        let path = std::path::PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../config/grafana-dashboard.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut queries = Vec::new();
        collect_exprs(&dashboard, &mut queries);
        assert!(queries.len() >= 8, "the dashboard has its panels");
        let exported = names();
        let mut used = 0;
        for query in &queries {
            for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("projector_") {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        word.strip_suffix(suffix)
                            .filter(|b| exported.iter().any(|e| e == b))
                    })
                    .unwrap_or(word);
                assert!(
                    exported.iter().any(|e| e == base),
                    "`{word}` in `{query}` is not exported: {exported:?}"
                );
                used += 1;
            }
        }
        assert!(used >= queries.len(), "every query names a metric");
    }

    fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, field) in fields {
                    match (key.as_str(), field) {
                        ("expr" | "query", serde_json::Value::String(text)) => out.push(text.clone()),
                        _ => collect_exprs(field, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
            _ => {}
        }
    }
}
