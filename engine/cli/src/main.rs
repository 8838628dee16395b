//! The `projector` command: wires the engine to the built-in projections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use engine::config::Config;

mod control;
mod demo;

/// The fold loop allocates per event (decoded values, JSON state); mimalloc's
/// thread-local free lists make that markedly cheaper than glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Projector: Kafka event streams into read models in RocksDB.
#[derive(Parser)]
#[command(name = "projector", version)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker: consume, fold, serve.
    Run {
        /// The deployment's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run everything in one process: an in-process Kafka cluster, the schema
    /// registry, a producer of demo events and a worker with its HTTP API.
    Demo {
        /// The worker's config (brokers, registry and store are replaced by the demo's).
        #[arg(long, short, default_value = "config/demo.toml")]
        config: PathBuf,
        /// Address of the HTTP API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Validate the config, schemas and upcasters without touching Kafka.
    Check {
        /// The deployment's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Drop a projection's state and offsets in a stopped deployment, so the next
    /// `run` rebuilds it from offset 0 (the worker must not be running).
    Reset {
        /// The projection.
        name: String,
        /// The deployment's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Rebuild a projection from offset 0 in a running worker, beside the live
    /// generation, which serves until the new one has caught up and is switched in.
    Replay {
        /// The projection.
        name: String,
        /// The deployment's TOML config (for the API address and admin token).
        #[arg(long, short)]
        config: PathBuf,
        /// Show progress and wait for the switch; exit non-zero if it does not happen.
        #[arg(long)]
        wait: bool,
        /// The worker's API, when not at the config's `http.listen`.
        #[arg(long)]
        url: Option<String>,
        /// A PEM file of the CA to trust for an https:// API (besides the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Build a frozen generation of a projection in a running worker that folds
    /// only the events up to a time, read as `GET .../state/{key}?at=<until>`.
    AsOf {
        /// The projection.
        name: String,
        /// The time, RFC 3339 (`2026-06-30T23:59:59.000Z`): events at or before it are folded.
        #[arg(long)]
        until: String,
        /// The deployment's TOML config (for the API address and admin token).
        #[arg(long, short)]
        config: PathBuf,
        /// Wait until it is complete; exit non-zero if it stops.
        #[arg(long)]
        wait: bool,
        /// The worker's API, when not at the config's `http.listen`.
        #[arg(long)]
        url: Option<String>,
        /// A PEM file of the CA to trust for an https:// API (besides the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Print a running worker's projections: generation, state, replay, lag.
    Status {
        /// The deployment's TOML config (for the API address and tokens).
        #[arg(long, short)]
        config: PathBuf,
        /// The worker's API, when not at the config's `http.listen`.
        #[arg(long)]
        url: Option<String>,
        /// A PEM file of the CA to trust for an https:// API (besides the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Write a consistent checkpoint of every projection's live generation (state,
    /// offsets, definition) into a new or empty directory: through the running
    /// worker's API (admin token), or straight from the store when no worker holds it.
    Checkpoint {
        /// The deployment's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Where to write it (on the worker's machine).
        #[arg(long)]
        to: PathBuf,
        /// The worker's API, when not at the config's `http.listen`.
        #[arg(long)]
        url: Option<String>,
        /// A PEM file of the CA to trust for an https:// API (besides the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Seed an empty store (the config's `store.path`) from a checkpoint; a worker
    /// started on it continues from the checkpoint's offsets.
    Restore {
        /// The deployment's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// The checkpoint directory.
        #[arg(long)]
        from: PathBuf,
    },
    /// Run a development schema registry (Confluent REST API).
    Registry {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Directory to persist subjects and schemas in; in memory when absent.
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's screen is its summary; its logs default to warnings only.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("projector: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("projector: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let loaded = Config::load(&config)?;
            engine::worker::run(loaded, &config, &builtins()).await?;
        }
        Command::Demo { config, listen } => demo::run(&config, listen, builtins()).await?,
        Command::Reset { name, config } => {
            let loaded = Config::load(&config)?;
            anyhow::ensure!(
                loaded.projections.iter().any(|p| p.name == name),
                "{}: no projection named `{name}`",
                config.display()
            );
            let store = engine::store::Store::open(&loaded.store.path, true).with_context(|| {
                format!(
                    "opening {} (is a worker still running on it?)",
                    loaded.store.path.display()
                )
            })?;
            let dropped = store.reset(&name)?;
            println!(
                "{name}: dropped {} (state and offsets); the next run rebuilds it from offset 0",
                dropped.join(", ")
            );
        }
        Command::Replay {
            name,
            config,
            wait,
            url,
            ca_file,
        } => {
            control::replay(
                &control::WorkerApi::new(&config, url, ca_file.as_deref())?,
                &name,
                wait,
            )
            .await?
        }
        Command::AsOf {
            name,
            until,
            config,
            wait,
            url,
            ca_file,
        } => {
            control::as_of(
                &control::WorkerApi::new(&config, url, ca_file.as_deref())?,
                &name,
                &until,
                wait,
            )
            .await?
        }
        Command::Checkpoint {
            config,
            to,
            url,
            ca_file,
        } => {
            let loaded = Config::load(&config)?;
            let to = std::path::absolute(&to).with_context(|| format!("--to {}", to.display()))?;
            // A stopped store is read directly; RocksDB's lock says a worker runs.
            let manifest = match engine::store::Store::open(&loaded.store.path, false) {
                Ok(store) => store.checkpoint(&to)?,
                Err(e) if e.to_string().to_ascii_lowercase().contains("lock") => {
                    let api = control::WorkerApi::new(&config, url, ca_file.as_deref())?;
                    control::checkpoint(&api, &to).await?
                }
                Err(e) => return Err(e.into()),
            };
            println!("{}", serde_json::to_string_pretty(&manifest)?);
        }
        Command::Restore { config, from } => {
            let loaded = Config::load(&config)?;
            let manifest = engine::store::restore(&from, &loaded.store.path)?;
            for projection in &manifest.projections {
                let events: i64 = projection.offsets.values().sum();
                println!(
                    "{}: generation {} restored at {} source partitions ({events} offsets in all)",
                    projection.name,
                    projection.generation,
                    projection.offsets.len()
                );
            }
        }
        Command::Status { config, url, ca_file } => {
            control::status(&control::WorkerApi::new(&config, url, ca_file.as_deref())?).await?
        }
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            let summary = engine::worker::check(&loaded, &config, &builtins())?;
            println!("{}: ok ({summary})", config.display());
        }
        Command::Registry { listen, data } => {
            let subjects = registry::open(data).map_err(anyhow::Error::msg)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            tracing::info!(%listen, "schema registry started");
            axum_serve(listener, registry::router(subjects)).await?;
        }
    }
    Ok(())
}

async fn axum_serve(listener: tokio::net::TcpListener, router: axum::Router) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving HTTP")
}

fn builtins() -> engine::worker::Builtins {
    engine::worker::Builtins {
        projections: projections::registry(),
        upcasters: projections::upcasters(),
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour codes only for a person at a terminal, never in a file or a pipe.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
