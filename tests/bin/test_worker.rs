//! `projector run` with two extra, test-only projection kinds:
//! - `panic_on_marker`: `order_summary`, except that its fold panics on an
//!   `OrderPlaced` whose order id starts with `panic-`. The end-to-end tests run
//!   it to prove that a panic in projection code is contained (DESIGN.md
//!   invariant 6);
//! - `slow_order_summary`: `order_summary` taking `options.fold_micros` (default
//!   2000) per event, so that restoring a partition takes long enough for a
//!   reader to notice a worker that served it too early (`tests/cluster.rs`).
//!
//! Neither is part of the product; they never ship in the `projector` binary.
//!
//! Usage: `projector-test-worker --config FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use engine::projection::{Event, FoldError, OptionsError, PartitionState, Projection, State};
use projections::order_summary::OrderSummary;
use serde_json::Value as Json;

/// Something done before `order_summary` folds an event.
type BeforeFold = Box<dyn Fn(&Event<'_>, &mut dyn PartitionState) -> Result<(), FoldError> + Send + Sync>;

/// `order_summary`, with something done before each fold.
struct OrderSummaryWith(BeforeFold);

impl Projection for OrderSummaryWith {
    fn apply(&self, event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError> {
        (self.0)(event, state)?;
        Projection::apply(&OrderSummary, event, state)
    }

    fn merge(&self, key: &str, partials: Vec<State>) -> Result<Option<Json>, FoldError> {
        Projection::merge(&OrderSummary, key, partials)
    }

    fn encode(&self, state: &State) -> Result<Vec<u8>, FoldError> {
        Projection::encode(&OrderSummary, state)
    }

    fn decode(&self, bytes: &[u8]) -> Result<State, FoldError> {
        Projection::decode(&OrderSummary, bytes)
    }
}

/// Panics on an `OrderPlaced` whose order id starts with `panic-`.
fn panic_on_marker(event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError> {
    if let apache_avro::types::Value::Record(fields) = event.payload {
        let marker = fields.iter().any(|(name, value)| {
            name == "orderId"
                && matches!(value, apache_avro::types::Value::String(id) if id.starts_with("panic-"))
        });
        if marker {
            // Change the state first, as a buggy fold might, so the test also
            // proves that a half-done change is never committed.
            state.update("~scratch", &mut |s| {
                *s = Some(Box::new(Json::from("half-done")));
                Ok(())
            })?;
            panic!("marker event at offset {}", event.meta.offset);
        }
    }
    Ok(())
}

fn build_slow(options: &Json) -> Result<Box<dyn Projection>, OptionsError> {
    let micros = match options.get("fold_micros") {
        None => 2_000,
        Some(value) => value
            .as_u64()
            .ok_or_else(|| OptionsError("fold_micros: a number of microseconds".into()))?,
    };
    let pause = std::time::Duration::from_micros(micros);
    Ok(Box::new(OrderSummaryWith(Box::new(move |_, _| {
        std::thread::sleep(pause);
        Ok(())
    }))))
}

fn build_panic_on_marker(_options: &Json) -> Result<Box<dyn Projection>, OptionsError> {
    Ok(Box::new(OrderSummaryWith(Box::new(panic_on_marker))))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let config = match args.as_slice() {
        [_, flag, path] if flag == "--config" => PathBuf::from(path),
        _ => {
            eprintln!("usage: projector-test-worker --config FILE");
            return ExitCode::FAILURE;
        }
    };
    let mut builtins = engine::worker::Builtins {
        projections: projections::registry(),
        upcasters: projections::upcasters(),
    };
    builtins
        .projections
        .insert("panic_on_marker", build_panic_on_marker);
    builtins.projections.insert("slow_order_summary", build_slow);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("projector-test-worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let loaded = engine::config::Config::load(&config)?;
        engine::worker::run(loaded, &config, &builtins).await?;
        anyhow::Ok(())
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("projector-test-worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}
