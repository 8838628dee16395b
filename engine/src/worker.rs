//! `projector run`: builds the configured projections and runs them until a signal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::info;

use crate::config::{Config, ConfigError};
use crate::decode::Decoder;
use crate::projection::{Projection, ProjectionRegistry};
use crate::registry_client::RegistryClient;
use crate::runtime::ProjectionRuntime;
use crate::schemas::ReaderSchemas;
use crate::serve::{self, ApiState};
use crate::source::{self, SourceDeps};
use crate::store::Store;

/// The largest single allocation Avro decoding may make (a string, bytes, an array
/// block): a corrupt length prefix must not take the process down.
const MAX_AVRO_ALLOCATION_BYTES: usize = 64 * 1024 * 1024;

/// Why the worker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The schema set is wrong.
    #[error(transparent)]
    Schemas(#[from] crate::schemas::SchemaSetError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Anything else at start-up (registry client, HTTP listener).
    #[error("{0}")]
    Startup(String),
}

/// Builds every configured projection from the built-ins, or says which entry of
/// the config is wrong.
pub fn build_projections(
    config: &Config,
    config_path: &Path,
    builtins: &ProjectionRegistry,
) -> Result<Vec<Arc<dyn Projection>>, ConfigError> {
    config
        .projections
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let factory = builtins.get(entry.kind.as_str()).ok_or_else(|| {
                let known: Vec<&str> = builtins.keys().copied().collect();
                ConfigError::at(
                    config_path,
                    &format!("projections[{index}].kind"),
                    format!(
                        "unknown projection kind `{}` (built-ins: {})",
                        entry.kind,
                        known.join(", ")
                    ),
                )
            })?;
            let options = if entry.options.is_null() {
                serde_json::Value::Object(Default::default())
            } else {
                entry.options.clone()
            };
            factory(&options).map(Arc::from).map_err(|e| {
                ConfigError::at(config_path, &format!("projections[{index}].options"), e)
            })
        })
        .collect()
}

/// Runs the worker until SIGINT or SIGTERM.
pub async fn run(
    config: Config,
    config_path: &Path,
    builtins: &ProjectionRegistry,
) -> Result<(), WorkerError> {
    apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION_BYTES);
    crate::metrics::init();
    let projections = build_projections(&config, config_path, builtins)?;
    let readers = Arc::new(ReaderSchemas::load(&config.schemas.dir)?);
    let store = Arc::new(Store::open(&config.store.path, config.store.sync_writes)?);
    let registry = Arc::new(
        RegistryClient::new(&config.registry, tokio::runtime::Handle::current())
            .map_err(|e| WorkerError::Startup(e.to_string()))?,
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    let deps = SourceDeps {
        kafka: config.kafka.clone(),
        store_config: config.store.clone(),
        store: store.clone(),
        shutdown: shutdown.clone(),
    };

    let mut runtimes = BTreeMap::new();
    for (entry, projection) in config.projections.iter().zip(projections) {
        let generation = store.live_generation(&entry.name)?;
        let runtime = Arc::new(ProjectionRuntime::new(
            entry.name.clone(),
            entry.kind.clone(),
            entry.topics.clone(),
            projection,
            generation,
        ));
        runtimes.insert(entry.name.clone(), runtime);
    }

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| WorkerError::Startup(format!("http.listen {}: {e}", config.http.listen)))?;
    info!(listen = %config.http.listen, projections = runtimes.len(), "worker started");

    let threads: Vec<_> = runtimes
        .values()
        .map(|runtime| {
            let decoder = Decoder::new(registry.clone(), readers.clone());
            source::spawn(runtime.clone(), decoder, deps.clone())
        })
        .collect();

    let api = serve::router(ApiState {
        projections: Arc::new(runtimes),
        store,
    });
    let signal_flag = shutdown.clone();
    axum::serve(listener, api)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            info!("shutdown requested");
            signal_flag.store(true, Ordering::Relaxed);
        })
        .await
        .map_err(|e| WorkerError::Startup(format!("http server: {e}")))?;

    tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await
    .map_err(|e| WorkerError::Startup(format!("joining fold loops: {e}")))?;
    info!("worker stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
