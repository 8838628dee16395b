//! Every Prometheus metric Projector exports, in one place.
//!
//! Names follow `projector_<what>_<unit>[_total]`; labels come from a small fixed
//! set, never from error text. The fold loop counts in locals and publishes once
//! per batch.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
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

/// Counts one schema registry request.
pub fn registry_request(outcome: &str) {
    REGISTRY_REQUESTS.with_label_values(&[outcome]).inc();
}

/// Makes every metric visible in the scrape before its first sample.
pub fn init() {
    LazyLock::force(&EVENTS_APPLIED);
    LazyLock::force(&POISON_EVENTS);
    LazyLock::force(&DEAD_LETTERS);
    LazyLock::force(&OPERATOR_SKIPS);
    LazyLock::force(&UPCASTS);
    LazyLock::force(&REGISTRY_REQUESTS);
    LazyLock::force(&LAST_PROGRESS);
    LazyLock::force(&BATCH_COMMIT_SECONDS);
    LazyLock::force(&BATCH_EVENTS);
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut buffer)
        .expect("text encoding into memory cannot fail");
    String::from_utf8(buffer).expect("Prometheus text format is UTF-8")
}
