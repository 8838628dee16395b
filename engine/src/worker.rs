//! `projector run`: builds the configured projections and runs them until a signal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::cluster::Cluster;
use crate::config::{Config, ConfigError, ProjectionConfig, ProjectionDefinition};
use crate::declarative::Declarative;
use crate::decode::Decoder;
use crate::descriptors::{self, Budget};
use crate::fold::{self, SharedSource, SourceDeps};
use crate::fold_state::Fold;
use crate::listener;
use crate::projection::{Projection, ProjectionRegistry};
use crate::registry_client::RegistryClient;
use crate::schemas::{RustUpcasters, SchemaSet};
use crate::serve::{self, ApiState};
use crate::store::{Generation, Store};
use crate::supervisor::Supervisor;

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

/// What the binary contributes: built-in projections and Rust upcasters by name.
pub struct Builtins {
    /// Built-in projections.
    pub projections: ProjectionRegistry,
    /// Rust upcasters that upcast files can name.
    pub upcasters: RustUpcasters,
}

/// What a successful check found.
pub struct CheckSummary {
    /// The configured projections, built.
    pub projections: Vec<Arc<dyn Projection>>,
    /// The schema set, checked.
    pub schemas: SchemaSet,
}

impl std::fmt::Display for CheckSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (types, versions, steps) = self.schemas.counts();
        write!(
            f,
            "{} projections; {types} event types, {versions} schema versions, {steps} upcaster steps checked",
            self.projections.len()
        )
    }
}

/// `projector check`: the config's projections build, the schema set loads, every
/// version reaches the newest and every upcaster's output validates. Touches
/// neither Kafka nor the registry.
pub fn check(config: &Config, config_path: &Path, builtins: &Builtins) -> Result<CheckSummary, WorkerError> {
    let schemas = SchemaSet::load(&config.schemas.dir, &builtins.upcasters)?;
    schemas.check()?;
    let projections = build_projections(config, config_path, &builtins.projections, &schemas)?;
    Ok(CheckSummary { projections, schemas })
}

/// Builds every configured projection from the built-ins, or says which entry of
/// the config is wrong.
pub fn build_projections(
    config: &Config,
    config_path: &Path,
    builtins: &ProjectionRegistry,
    schemas: &SchemaSet,
) -> Result<Vec<Arc<dyn Projection>>, ConfigError> {
    config
        .projections
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            build(&entry.definition(), builtins, schemas).map_err(|(key, message)| {
                ConfigError::at(
                    config_path,
                    format!("projections[{index}].{key}").trim_end_matches('.'),
                    format!("projection `{}`: {message}", entry.name),
                )
            })
        })
        .collect()
}

/// Builds a projection from a definition (see [`crate::config::ProjectionDefinition`]);
/// on failure, the key of the definition that is wrong and why.
fn build(
    definition: &serde_json::Value,
    builtins: &ProjectionRegistry,
    schemas: &SchemaSet,
) -> Result<Arc<dyn Projection>, (String, String)> {
    let definition: ProjectionDefinition = serde_json::from_value(definition.clone())
        .map_err(|e| (String::new(), format!("unreadable definition: {e}")))?;
    if let Some(declarative) = &definition.declarative {
        let compiled =
            Declarative::compile(declarative).map_err(|e| (format!("declarative.{}", e.path), e.message))?;
        return Ok(Arc::new(compiled.with_declared_decimals(schemas)));
    }
    let kind = definition.kind.as_deref().unwrap_or_default();
    let factory = builtins.get(kind).ok_or_else(|| {
        let known: Vec<&str> = builtins.keys().copied().collect();
        (
            "kind".to_owned(),
            format!(
                "unknown projection kind `{kind}` (built-ins: {})",
                known.join(", ")
            ),
        )
    })?;
    factory(&definition.options)
        .map(Arc::from)
        .map_err(|e| ("options".to_owned(), e.to_string()))
}

/// The fold of one stored generation, built from the definition recorded with it
/// (recording the configured one for a generation that has none yet).
fn stored_fold(
    store: &Store,
    entry: &ProjectionConfig,
    configured: &Arc<dyn Projection>,
    generation: Generation,
    live: bool,
    builtins: &ProjectionRegistry,
    schemas: &SchemaSet,
) -> Result<Fold, WorkerError> {
    let configured_definition = entry.definition();
    let definition = match store.definition(&generation)? {
        Some(recorded) => recorded,
        None => {
            store.record_definition(&generation, &configured_definition)?;
            configured_definition.clone()
        }
    };
    let projection = if definition == configured_definition {
        configured.clone()
    } else {
        let projection = build(&definition, builtins, schemas).map_err(|(key, message)| {
            WorkerError::Startup(format!(
                "generation {} of `{}` was built with a definition this worker cannot build \
                 ({key}: {message}); `projector reset {}` rebuilds it with the configured one",
                generation.number, entry.name, entry.name
            ))
        })?;
        warn!(projection = %entry.name, generation = generation.number,
            "the configured definition differs from the one generation {} was built with; it keeps \
             folding with its own until `projector replay {}` builds one with the configured definition",
            generation.number, entry.name);
        projection
    };
    let topics = crate::config::definition_topics(&definition);
    Ok(Fold::new(generation, projection, topics, live))
}

/// Runs the worker until SIGINT or SIGTERM, after the same checks as [`check`].
pub async fn run(mut config: Config, config_path: &Path, builtins: &Builtins) -> Result<(), WorkerError> {
    apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION_BYTES);
    crate::metrics::init();
    let CheckSummary { projections, schemas } = check(&config, config_path, builtins)?;
    let schemas = Arc::new(schemas);
    let budget = Budget::new(
        config.http.max_connections,
        config.store.max_open_files,
        config.projections.len(),
    );
    let descriptors = descriptors::ensure(&budget).map_err(|e| WorkerError::Startup(e.to_string()))?;
    info!(
        needed = budget.total(),
        limit = descriptors,
        "file descriptors: the budget fits RLIMIT_NOFILE"
    );
    let tls = match &config.http.tls {
        Some(tls) => Some(listener::tls_acceptor(&tls.cert, &tls.key).map_err(WorkerError::Startup)?),
        None => None,
    };
    let store = Arc::new(Store::open_with_max_files(
        &config.store.path,
        config.store.sync_writes,
        config.store.max_open_files,
    )?);
    let registry = Arc::new(
        RegistryClient::new(&config.registry, tokio::runtime::Handle::current())
            .map_err(|e| WorkerError::Startup(e.to_string()))?,
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    let cluster = join_cluster(&mut config).await?;
    let sources = shared_sources(&config);
    let deps = SourceDeps {
        sources: Arc::new(sources.clone()),
        kafka: config.kafka.clone(),
        store_config: config.store.clone(),
        replay_config: config.replay.clone(),
        store: store.clone(),
        shutdown: shutdown.clone(),
        async_runtime: tokio::runtime::Handle::current(),
    };

    let mut supervisors = BTreeMap::new();
    for (entry, projection) in config.projections.iter().zip(projections) {
        for dropped in store.drop_orphans(&entry.name)? {
            info!(generation = %dropped, "dropped a generation left by an interrupted switch or abort");
        }
        let generation = store.live_generation(&entry.name)?;
        let live = stored_fold(
            &store,
            entry,
            &projection,
            generation,
            true,
            &builtins.projections,
            &schemas,
        )?;
        let replay = match store.replay_generation(&entry.name)? {
            Some(generation) => Some(stored_fold(
                &store,
                entry,
                &projection,
                generation,
                false,
                &builtins.projections,
                &schemas,
            )?),
            None => None,
        };
        let supervisor = Arc::new(Supervisor::new(entry, projection.clone(), live, replay));
        if cluster.is_some() {
            supervisor.set_clustered();
        }
        for record in store.as_of_records(&entry.name)? {
            let generation = crate::store::Generation {
                projection: entry.name.clone(),
                number: record.generation,
            };
            let fold = stored_fold(
                &store,
                entry,
                &projection,
                generation,
                false,
                &builtins.projections,
                &schemas,
            )?;
            supervisor.restore_as_of(fold.with_as_of(crate::as_of::AsOfSpec::from_record(&record)));
        }
        supervisors.insert(entry.name.clone(), supervisor);
    }

    let socket = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| WorkerError::Startup(format!("http.listen {}: {e}", config.http.listen)))?;
    info!(listen = %config.http.listen, projections = supervisors.len(), "worker started");

    let threads = Arc::new(Mutex::new(Vec::new()));
    for source in sources.values() {
        let (registry, schemas, deps, threads) =
            (registry.clone(), schemas.clone(), deps.clone(), threads.clone());
        source.set_starter(Box::new(move |source, members| {
            let decoder = Decoder::new(registry.clone(), schemas.clone());
            let thread = fold::spawn_source(source, members, decoder, deps.clone());
            threads.lock().expect("threads lock").push(thread);
        }));
    }
    for supervisor in supervisors.values() {
        let spawner = {
            let weak = Arc::downgrade(supervisor);
            let (registry, schemas, deps, threads) =
                (registry.clone(), schemas.clone(), deps.clone(), threads.clone());
            move |fold| {
                let Some(supervisor) = weak.upgrade() else {
                    return;
                };
                let decoder = Decoder::new(registry.clone(), schemas.clone());
                let thread = fold::spawn(supervisor, fold, decoder, deps.clone());
                threads.lock().expect("threads lock").push(thread);
            }
        };
        supervisor.set_spawner(Box::new(spawner));
    }
    start_folds(&store, &supervisors, &sources)?;

    let lag_monitor = crate::lag::spawn(
        &config.kafka,
        config.replay.switch_lag_events,
        store.clone(),
        supervisors.values().cloned().collect(),
        shutdown.clone(),
    )
    .map_err(|e| WorkerError::Startup(format!("lag monitor: {e}")))?;
    let cluster_threads = match &cluster {
        Some(cluster) => {
            let projections = supervisors.values().cloned().collect();
            let view = crate::cluster::topic::spawn_view(cluster.clone(), &config.kafka, shutdown.clone());
            let publisher = crate::cluster::topic::spawn_publisher(
                cluster.clone(),
                &config.kafka,
                store.clone(),
                projections,
                config.replay.switch_lag_events,
                shutdown.clone(),
            );
            vec![
                view.map_err(WorkerError::Startup)?,
                publisher.map_err(WorkerError::Startup)?,
            ]
        }
        None => Vec::new(),
    };
    let api = serve::router(ApiState {
        projections: Arc::new(supervisors),
        store,
        admin_token: config.http.admin_token.clone(),
        read_tokens: Arc::new(config.http.read_tokens()),
        protect_probes: config.http.protect_probes,
        scans: Arc::new(tokio::sync::Semaphore::new(config.http.max_concurrent_scans)),
        kafka: Some(config.kafka.clone()),
        cluster,
    });
    let limits = listener::Limits {
        header_timeout: Duration::from_millis(config.http.header_timeout_ms),
        idle_timeout: Duration::from_millis(config.http.idle_timeout_ms),
        request_timeout: Duration::from_millis(config.http.request_timeout_ms),
        max_connections: config.http.max_connections,
    };
    let signal_flag = shutdown.clone();
    listener::serve(socket, api, limits, tls, async move {
        shutdown_signal().await;
        info!("shutdown requested");
        signal_flag.store(true, Ordering::Relaxed);
    })
    .await;

    tokio::task::spawn_blocking(move || {
        let threads = std::mem::take(&mut *threads.lock().expect("threads lock"));
        for thread in threads {
            let _ = thread.join();
        }
        let _ = lag_monitor.join();
        for thread in cluster_threads {
            let _ = thread.join();
        }
    })
    .await
    .map_err(|e| WorkerError::Startup(format!("joining fold loops: {e}")))?;
    info!("worker stopped");
    Ok(())
}

/// Multi-worker mode: this worker's cluster membership, with its cluster topic
/// created when missing; static membership set on the fold consumers when
/// configured. `None` without `[cluster]`.
async fn join_cluster(config: &mut Config) -> Result<Option<Arc<Cluster>>, WorkerError> {
    let Some(cluster_config) = &config.cluster else {
        return Ok(None);
    };
    let cluster = Cluster::new(cluster_config, &config.kafka, config.http.listen.port())
        .map_err(WorkerError::Startup)?;
    if cluster_config.static_membership {
        config.kafka.group_instance_id = Some(cluster.worker_id.clone());
    }
    crate::cluster::topic::ensure(&config.kafka, &cluster.topic)
        .await
        .map_err(WorkerError::Startup)?;
    info!(worker = %cluster.worker_id, topic = %cluster.topic, url = %cluster.url, "joining the cluster");
    Ok(Some(Arc::new(cluster)))
}

/// One shared source per set of topics that two or more projections read.
fn shared_sources(config: &Config) -> BTreeMap<Vec<String>, Arc<SharedSource>> {
    let mut readers: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for projection in &config.projections {
        let mut topics = projection.topics.clone();
        topics.sort();
        *readers.entry(topics).or_default() += 1;
    }
    readers
        .into_iter()
        .filter(|(_, count)| *count >= 2)
        .map(|(topics, count)| {
            let source = SharedSource::new(&topics, count);
            (topics, source)
        })
        .collect()
}

/// Starts every projection's loops. The live generations of projections that
/// share a source start in it when they are within [`fold::JOIN_DISTANCE`]
/// events of the furthest one; the others fold on their own until they are near
/// (see `fold::source`).
fn start_folds(
    store: &Store,
    supervisors: &BTreeMap<String, Arc<Supervisor>>,
    sources: &BTreeMap<Vec<String>, Arc<SharedSource>>,
) -> Result<(), WorkerError> {
    // Per topic set: each projection's live fold and the events it has applied.
    type Candidate = (Arc<Supervisor>, Arc<Fold>, i64);
    let mut members: BTreeMap<Vec<String>, Vec<Candidate>> = BTreeMap::new();
    for supervisor in supervisors.values() {
        let live = supervisor.live();
        let mut topics = live.topics.clone();
        topics.sort();
        // In multi-worker mode a replayed generation keeps its own consumer
        // group (`.g<n>`, where every worker folded it), so the workers agree
        // on which group each generation reads in.
        if !sources.contains_key(&topics) || (supervisor.is_clustered() && live.generation.number > 1) {
            supervisor.start();
            continue;
        }
        supervisor.start_all_but_live();
        let applied: i64 = store
            .offsets(&live.generation)?
            .values()
            .fold(0i64, |sum, next| sum.saturating_add(*next));
        members
            .entry(topics)
            .or_default()
            .push((supervisor.clone(), live, applied));
    }
    for (topics, folds) in members {
        let furthest = folds.iter().map(|(_, _, applied)| *applied).max().unwrap_or(0);
        let (near, behind): (Vec<_>, Vec<_>) = folds
            .into_iter()
            .partition(|(_, _, applied)| furthest.saturating_sub(*applied) <= fold::JOIN_DISTANCE);
        for (supervisor, fold, _) in behind {
            info!(projection = %supervisor.name, "behind the shared source: folding on its own until near it");
            supervisor.spawn(fold);
        }
        let near = near
            .into_iter()
            .map(|(supervisor, fold, _)| (supervisor, fold))
            .collect();
        sources[&topics].start(near);
    }
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
