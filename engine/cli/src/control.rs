//! `projector replay`, `as-of`, `checkpoint` (of a running worker) and `status`:
//! talk to a running worker's HTTP API.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use engine::config::Config;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// How long `--wait` keeps trying while the worker does not answer (a restart).
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(120);

/// The worker a deployment config describes.
pub struct WorkerApi {
    base: String,
    token: Option<String>,
    /// What reads send: a read token when reads need one, else the admin token.
    read_token: Option<String>,
    client: reqwest::Client,
}

impl WorkerApi {
    /// The API of the worker `config` describes (https:// when it has `http.tls`),
    /// or at `url` when given; `ca_file` is a PEM CA to trust besides the system's.
    pub fn new(config: &Path, url: Option<String>, ca_file: Option<&Path>) -> Result<WorkerApi> {
        let loaded = Config::load(config)?;
        let base = url.unwrap_or_else(|| {
            let mut listen: SocketAddr = loaded.http.listen;
            if listen.ip().is_unspecified() {
                listen.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            let scheme = if loaded.http.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{listen}")
        });
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(ca_file) = ca_file {
            let pem = std::fs::read(ca_file).with_context(|| format!("--ca-file {}", ca_file.display()))?;
            let ca = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("--ca-file {}: not a PEM certificate", ca_file.display()))?;
            client = client.add_root_certificate(ca);
        }
        let client = client.build().context("building the HTTP client")?;
        let read_token = loaded
            .http
            .read_tokens()
            .into_iter()
            .next()
            .or_else(|| loaded.http.admin_token.clone());
        Ok(WorkerApi {
            base: base.trim_end_matches('/').to_owned(),
            token: loaded.http.admin_token,
            read_token,
            client,
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.get(&url);
        if let Some(token) = &self.read_token {
            request = request.bearer_auth(token);
        }
        let (status, body) = answer(request, &format!("GET {url}")).await?;
        if !status.is_success() {
            bail!(
                "GET {url}: {status}: {}",
                body["error"].as_str().unwrap_or_default()
            );
        }
        Ok(body)
    }
}

impl WorkerApi {
    /// GET `path` while waiting out a worker that does not answer (a restart):
    /// `Ok(Err(_))` after a short pause while it has not answered for less than
    /// [`UNREACHABLE_LIMIT`] since `unreachable_since`, an error after that.
    async fn get_patiently(
        &self,
        path: &str,
        unreachable_since: &mut Option<Instant>,
    ) -> Result<Result<Value, anyhow::Error>> {
        match self.get(path).await {
            Ok(value) => {
                *unreachable_since = None;
                Ok(Ok(value))
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > UNREACHABLE_LIMIT {
                    return Err(e.context(format!("the worker did not answer for {UNREACHABLE_LIMIT:?}")));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(Err(e))
            }
        }
    }
}

/// Sends `request` (described as `what` in errors); its status and JSON body.
async fn answer(request: reqwest::RequestBuilder, what: &str) -> Result<(reqwest::StatusCode, Value)> {
    let response = request.send().await.with_context(|| what.to_owned())?;
    let status = response.status();
    let body: Value = response.json().await.with_context(|| format!("{what}: body"))?;
    Ok((status, body))
}

/// `projector checkpoint --to DIR` through a running worker.
pub async fn checkpoint(api: &WorkerApi, to: &Path) -> Result<engine::store::Manifest> {
    let url = format!("{}/checkpoint", api.base);
    let mut request = api.client.post(&url).json(&serde_json::json!({ "to": to }));
    if let Some(token) = &api.token {
        request = request.bearer_auth(token);
    }
    // A checkpoint of a large store takes longer than a read.
    let request = request.timeout(Duration::from_secs(600));
    let (status, body) = answer(request, &format!("POST {url}")).await?;
    if !status.is_success() {
        bail!(
            "checkpoint refused: {status}: {}",
            body["error"].as_str().unwrap_or_default()
        );
    }
    serde_json::from_value(body["checkpoint"].clone()).with_context(|| format!("POST {url}: the manifest"))
}

/// `projector replay NAME [--wait]`.
pub async fn replay(api: &WorkerApi, name: &str, wait: bool) -> Result<()> {
    let url = format!("{}/projections/{name}/replay", api.base);
    let mut request = api.client.post(&url);
    if let Some(token) = &api.token {
        request = request.bearer_auth(token);
    }
    let (status, body) = answer(request, &format!("POST {url}")).await?;
    if !status.is_success() {
        let running = body
            .get("replay")
            .map(|r| format!(" (running: {r})"))
            .unwrap_or_default();
        bail!(
            "{name}: replay refused: {status}: {}{running}",
            body["error"].as_str().unwrap_or_default()
        );
    }
    let generation = body["replay"]["generation"]
        .as_u64()
        .context("the worker's answer has no replay generation")?;
    println!("{name}: replay into generation {generation} started");
    if wait {
        wait_for_switch(api, name, generation).await?;
    }
    Ok(())
}

/// `projector as-of NAME --until T [--wait]`.
pub async fn as_of(api: &WorkerApi, name: &str, until: &str, wait: bool) -> Result<()> {
    let url = format!("{}/projections/{name}/as-of", api.base);
    let mut request = api.client.post(&url).json(&serde_json::json!({ "until": until }));
    if let Some(token) = &api.token {
        request = request.bearer_auth(token);
    }
    let (status, body) = answer(request, &format!("POST {url}")).await?;
    if !status.is_success() {
        bail!(
            "{name}: as-of refused: {status}: {}",
            body["error"].as_str().unwrap_or_default()
        );
    }
    let started = &body["as_of_generation"];
    let until = started["until"].as_str().unwrap_or(until).to_owned();
    println!(
        "{name}: as-of generation {} until {until} started",
        started["generation"]
    );
    if !wait {
        return Ok(());
    }
    let mut last_line = Instant::now();
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let Ok(projection) = api
            .get_patiently(&format!("/projections/{name}"), &mut unreachable_since)
            .await?
        else {
            continue;
        };
        let Some(generation) = projection["as_of_generations"]
            .as_array()
            .and_then(|all| all.iter().find(|g| g["until"] == until.as_str()))
        else {
            bail!("{name}: the as-of generation until {until} is gone (removed?)");
        };
        if generation["complete"] == true {
            println!("{name}: as-of generation until {until} is complete");
            return Ok(());
        }
        let state = generation["status"]["state"].as_str().unwrap_or_default();
        if matches!(state, "poisoned" | "failed") {
            bail!(
                "{name}: the as-of generation until {until} stopped: {}",
                generation["status"]
            );
        }
        if last_line.elapsed() >= Duration::from_secs(5) {
            let progress = &generation["progress"];
            eprintln!(
                "{name}: as of {until}: {}/{} events read",
                progress["read"], progress["target"]
            );
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_for_switch(api: &WorkerApi, name: &str, generation: u64) -> Result<()> {
    let started = Instant::now();
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {percent:>3}% {human_pos}/{human_len} events {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let interactive = std::io::stderr().is_terminal();
    let mut last_line = Instant::now();
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let projection = match api
            .get_patiently(&format!("/projections/{name}"), &mut unreachable_since)
            .await
        {
            Ok(Ok(projection)) => projection,
            Ok(Err(e)) => {
                bar.set_message(format!("(worker unreachable: {e:#})"));
                continue;
            }
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        let last = &projection["last_replay"];
        if last["generation"].as_u64() == Some(generation) {
            bar.finish_and_clear();
            return match last["outcome"].as_str() {
                Some("switched") => {
                    println!(
                        "{name}: generation {generation} is live (replay took {:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                    Ok(())
                }
                other => bail!(
                    "{name}: the replay into generation {generation} ended: {}",
                    other.unwrap_or("?")
                ),
            };
        }
        let replay = &projection["replay"];
        if replay["generation"].as_u64() != Some(generation) {
            bar.finish_and_clear();
            // The worker restarted since the switch (it forgets how replays ended).
            if projection["generation"].as_u64() >= Some(generation) {
                println!("{name}: generation {generation} is live");
                return Ok(());
            }
            bail!("{name}: the replay into generation {generation} is gone (aborted?)");
        }
        let fold_state = replay["fold"]["state"].as_str().unwrap_or_default();
        if matches!(fold_state, "poisoned" | "failed") {
            bar.abandon();
            bail!(
                "{name}: the replay into generation {generation} stopped: {}; resume, skip or abort it \
                 (POST .../resume, POST .../skip, DELETE .../replay)",
                replay["fold"]
            );
        }
        let progress = &replay["progress"];
        let (applied, target) = (
            progress["applied"].as_u64().unwrap_or(0),
            progress["target"].as_u64().unwrap_or(0),
        );
        let rate = progress["events_per_second"].as_f64().unwrap_or(0.0);
        let eta = progress["eta_seconds"]
            .as_f64()
            .map(|s| format!("ETA {s:.0} s"))
            .unwrap_or_else(|| "ETA ?".into());
        let phase = replay["phase"].as_str().unwrap_or_default();
        bar.set_length(target.max(1));
        bar.set_position(applied.min(target.max(1)));
        bar.set_message(format!("{rate:.0} events/s, {eta}, {phase}"));
        if !interactive && last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!("{name}: {applied}/{target} events, {rate:.0} events/s, {eta}, {phase}");
            last_line = Instant::now();
        }
        bar.tick();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One row per worker and projection: the partitions it serves and restores.
fn cluster_rows(cluster: &serde_json::Value) -> Vec<[String; 7]> {
    let mut rows = Vec::new();
    for worker in cluster["workers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let id = worker["worker_id"].as_str().unwrap_or("?");
        let url = worker["url"].as_str().unwrap_or("?");
        let Some(projections) = worker["projections"].as_object() else {
            continue;
        };
        for (name, claims) in projections {
            let partitions = |state: &str| {
                let list: Vec<String> = claims["partitions"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter(|c| c["state"] == state)
                    .map(|c| format!("{}/{}", c["topic"].as_str().unwrap_or("?"), c["partition"]))
                    .collect();
                if list.is_empty() {
                    "-".to_owned()
                } else {
                    list.join(",")
                }
            };
            rows.push([
                id.to_owned(),
                url.to_owned(),
                name.clone(),
                format!(
                    "g{} {}",
                    claims["generation"],
                    claims["status"].as_str().unwrap_or("?")
                ),
                partitions("live"),
                partitions("restoring"),
                claims["partitions"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| c["lag_events"].as_i64())
                    .fold(0i64, i64::saturating_add)
                    .to_string(),
            ]);
        }
    }
    rows
}

/// Prints `rows` under `header`, in columns.
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let widths: Vec<usize> = (0..N)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header));
    for row in rows {
        println!("{}", line(&row.iter().map(String::as_str).collect::<Vec<_>>()));
    }
}

/// `projector status`: a table of the worker's projections (and, in a cluster,
/// of every worker and the partitions it owns).
pub async fn status(api: &WorkerApi) -> Result<()> {
    let list = api.get("/projections").await?;
    let rows: Vec<[String; 6]> = list["projections"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let state = match p["status"]["state"].as_str().unwrap_or("?") {
                "running" => "live".to_owned(),
                other => other.to_owned(),
            };
            let replay = match p["replay"].as_object() {
                Some(r) => format!(
                    "g{} {} {:.0}%",
                    r["generation"],
                    r["phase"].as_str().unwrap_or_default(),
                    r["progress"]["ratio"].as_f64().unwrap_or(0.0) * 100.0
                ),
                None => "-".into(),
            };
            [
                p["name"].as_str().unwrap_or("?").to_owned(),
                format!("g{}", p["generation"]),
                state,
                replay,
                p["lag"]["events"].to_string(),
                format!("{:.1}", p["lag"]["seconds"].as_f64().unwrap_or(0.0)),
            ]
        })
        .collect();
    let header = [
        "PROJECTION",
        "GENERATION",
        "STATE",
        "REPLAY",
        "LAG EVENTS",
        "LAG SECONDS",
    ];
    print_table(&header, &rows);
    if let Some(cluster) = list["cluster"].as_object() {
        println!();
        println!(
            "cluster: seen from worker {}, topic {}",
            cluster["worker_id"].as_str().unwrap_or("?"),
            cluster["topic"].as_str().unwrap_or("?")
        );
        print_table(
            &[
                "WORKER",
                "URL",
                "PROJECTION",
                "GENERATION",
                "LIVE",
                "RESTORING",
                "LAG",
            ],
            &cluster_rows(&list["cluster"]),
        );
    }
    Ok(())
}
