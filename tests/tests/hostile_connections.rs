//! The HTTP API under hostile connections, with read tokens and over TLS, on a
//! worker started under `ulimit -n 1024` (the common default): slow and idle
//! connections are closed within the header timeout and never keep a
//! well-behaved reader out; a burst of 5,000 connections passes; reads can need a
//! token; TLS serves a client that trusts the CA, refuses plain HTTP, and
//! `projector status` follows an https:// URL.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use projector_tests::{
    order_summary_projections, orders, produce_command, projector_bin, repo_root, wait_for_oracle,
    wait_until, worker_config, write_events, Broker, Registry, Worker,
};

/// The config of a worker folding `orders` into `order_summary`, with `http`
/// (lines starting with `[http]`) as its HTTP section.
fn order_summary_config(dir: &Path, broker: &Broker, registry: &Registry, http: &str) -> String {
    worker_config(
        broker,
        registry,
        &dir.join("data"),
        &order_summary_projections(&[("order_summary", "orders")]),
    )
    .replace("[http]\n", http)
}

/// A script that runs `projector` with at most 1,024 open files.
fn limited_projector(dir: &Path) -> Result<PathBuf> {
    let script = dir.join("projector-ulimit-1024");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nulimit -n 1024 || exit 1\nexec '{}' \"$@\"\n",
            projector_bin().display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// `Max open files` of a process, from /proc.
fn open_files_limit(pid: u32) -> Result<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line")?;
    Ok(line
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// True once the server has closed `stream` (EOF or reset); false while open.
fn closed_by_server(mut stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[test]
fn slow_idle_and_bursting_connections_never_keep_a_reader_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let config = order_summary_config(
        dir.path(),
        &broker,
        &registry,
        "[http]\nheader_timeout_ms = 2000\nidle_timeout_ms = 2000\n",
    );
    let mut worker = Worker::start_binary(dir.path(), &config, &limited_projector(dir.path())?)?;
    ensure!(
        open_files_limit(worker.service.pid())? == "1024 1024",
        "the worker runs under ulimit -n 1024"
    );

    let stream = orders::generate("orders", 3_000, 41);
    let events = write_events(dir.path(), "events.jsonl", &stream.lines)?;
    let mut producer = produce_command(&broker, &registry, &events, 2_000).spawn()?;

    // A well-behaved reader, on a thread of its own, for as long as the attack.
    let url = worker.url();
    let reader = std::thread::spawn(move || -> Result<Vec<Duration>> {
        let client = projector_tests::http();
        let started = Instant::now();
        let mut latencies = Vec::new();
        while started.elapsed() < Duration::from_secs(8) {
            for path in ["/projections/order_summary", "/readyz", "/metrics"] {
                let sent = Instant::now();
                let response = client
                    .get(format!("{url}{path}"))
                    .send()
                    .with_context(|| format!("GET {path} during the attack"))?;
                latencies.push(sent.elapsed());
                let status = response.status().as_u16();
                // /readyz answers 503 while partitions are being assigned.
                ensure!(
                    status == 200 || (path == "/readyz" && status == 503),
                    "GET {path}: {status}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(latencies)
    });

    // 2,000 connections: half send a partial request line and stop, half send
    // nothing at all.
    let address = worker.url().trim_start_matches("http://").to_owned();
    let opened = Instant::now();
    let mut attackers = Vec::with_capacity(2_000);
    for n in 0..2_000 {
        let mut stream = TcpStream::connect(&address).with_context(|| format!("attacker {n}"))?;
        if n % 2 == 0 {
            let _ = stream.write_all(b"GET /projections HTTP/1.1\r\nHost: x\r\n");
        }
        attackers.push(stream);
    }
    let all_open = Instant::now();
    println!("opened 2,000 connections in {:?}", all_open - opened);
    for stream in &attackers {
        stream.set_nonblocking(true)?;
    }
    // Every one is closed by the server within the header timeout (2 s) of its
    // opening, plus the sweeper's tick (and this loop's).
    wait_until(
        "the server to close the slow connections",
        Duration::from_secs(8),
        || attackers.iter().filter(|s| !closed_by_server(s)).count() == 0,
    )?;
    let closing = all_open.elapsed();
    println!("all closed {closing:?} after the last one opened");
    ensure!(
        closing < Duration::from_millis(2_000 + 1_000),
        "closed {closing:?} after the last connection opened"
    );
    drop(attackers);

    let mut latencies = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    println!(
        "well-behaved reader: {} GETs, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        p99,
        latencies.last()
    );
    ensure!(p99 < Duration::from_millis(100), "p99 {p99:?} under attack");

    ensure!(producer.wait()?.success(), "the producer finished");
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;

    // A burst of 5,000 connections at once, then gone.
    let burst: Vec<TcpStream> = (0..5_000)
        .filter_map(|_| TcpStream::connect(&address).ok())
        .collect();
    ensure!(burst.len() > 1_000, "the burst connected {} times", burst.len());
    drop(burst);
    let ended = Instant::now();
    wait_until(
        "the worker to answer after the burst",
        Duration::from_secs(5),
        || {
            worker
                .get("/projections/order_summary")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        },
    )?;
    println!("answering {:?} after the burst", ended.elapsed());
    worker.service.check_alive()?;
    let errors = |log: &str| log.matches("cannot accept HTTP connections").count();
    let before = errors(&worker.service.log());
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        errors(&worker.service.log()) == before,
        "no accept errors once the burst has ended:\n{}",
        worker.service.log()
    );
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn reads_need_a_read_token_when_one_is_set() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 1)?;
    let registry = Registry::start(dir.path())?;
    let config = order_summary_config(
        dir.path(),
        &broker,
        &registry,
        "[http]\nread_token = [\"reader-one\", \"reader-two\"]\nadmin_token = \"the-admin\"\n",
    );
    let worker = Worker::start(dir.path(), &config)?;
    let client = projector_tests::http();
    let get = |path: &str, token: Option<&str>| -> Result<u16> {
        let mut request = client.get(format!("{}{path}", worker.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Ok(request.send()?.status().as_u16())
    };
    for path in [
        "/projections",
        "/projections/order_summary",
        "/projections/order_summary/state",
        "/projections/order_summary/state/k",
    ] {
        ensure!(get(path, None)? == 401, "{path} without a token");
        ensure!(
            get(path, Some("reader-three"))? == 401,
            "{path} with a wrong token"
        );
        ensure!(
            get(path, Some("reader-on"))? == 401,
            "{path} with a prefix of a token"
        );
        for token in ["reader-one", "reader-two"] {
            let status = get(path, Some(token))?;
            ensure!(status == 200 || status == 404, "{path} with {token}: {status}");
        }
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        ensure!(get(path, None)? != 401, "{path} stays open");
    }
    let post = |token: &str| -> Result<u16> {
        Ok(client
            .post(format!("{}/projections/order_summary/resume", worker.url()))
            .bearer_auth(token)
            .send()?
            .status()
            .as_u16())
    };
    ensure!(post("reader-one")? == 401, "a read token is not an admin token");
    ensure!(
        post("the-admin")? == 409,
        "the admin token still admits (not stopped: 409)"
    );
    Ok(())
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the openssl tool.
fn certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| -> Result<()> {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if !output.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=projector test CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ])?;
    Ok((dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key")))
}

#[test]
fn tls_serves_a_client_that_trusts_the_ca_and_refuses_plain_http() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 1)?;
    let registry = Registry::start(dir.path())?;
    let (ca, cert, key) = certificates(dir.path())?;
    let config = order_summary_config(
        dir.path(),
        &broker,
        &registry,
        &format!(
            "[http]\nheader_timeout_ms = 1000\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    );
    let worker = Worker::start(dir.path(), &config)?;
    let https = worker.url().replace("http://", "https://");
    let trusting = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let response = trusting
        .get(format!("{https}/projections/order_summary"))
        .send()?;
    ensure!(response.status() == 200, "{}", response.status());
    let body: serde_json::Value = response.json()?;
    ensure!(body["name"] == "order_summary", "{body}");
    // A client that does not trust the CA is refused by its own TLS check...
    let untrusting = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    ensure!(untrusting.get(format!("{https}/healthz")).send().is_err());
    // ...and plain HTTP gets no answer.
    ensure!(
        projector_tests::http()
            .get(format!("{}/healthz", worker.url()))
            .send()
            .is_err(),
        "plain HTTP is refused"
    );
    // A client that never starts its TLS handshake is closed at the header timeout.
    let silent = TcpStream::connect(worker.url().trim_start_matches("http://"))?;
    silent.set_nonblocking(true)?;
    let connected = Instant::now();
    wait_until(
        "the silent TLS client to be closed",
        Duration::from_secs(5),
        || closed_by_server(&silent),
    )?;
    ensure!(
        connected.elapsed() < Duration::from_millis(1_000 + 1_000),
        "closed after {:?} with a 1 s header timeout",
        connected.elapsed()
    );
    let status = std::process::Command::new(projector_bin())
        .args(["status", "--config"])
        .arg(worker.config_path())
        .arg("--url")
        .arg(&https)
        .arg("--ca-file")
        .arg(&ca)
        .current_dir(repo_root())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    ensure!(
        status.status.success() && text.contains("order_summary"),
        "projector status over https:\n{text}"
    );
    Ok(())
}

#[test]
fn a_descriptor_budget_over_the_limit_refuses_to_start_naming_both_numbers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    let registry = Registry::start(dir.path())?;
    let config = order_summary_config(dir.path(), &broker, &registry, "[http]\nmax_connections = 2000\n")
        .replace(
            "{HTTP_LISTEN}",
            &format!("127.0.0.1:{}", projector_tests::free_port()),
        );
    let file = dir.path().join("projector.toml");
    std::fs::write(&file, config)?;
    let output = std::process::Command::new(limited_projector(dir.path())?)
        .args(["run", "--config"])
        .arg(&file)
        .current_dir(repo_root())
        .output()?;
    let text = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "the worker must not start:\n{text}");
    // 128 + 2,001 + 256 + 64 needed; 1,024 allowed.
    ensure!(
        text.contains("needs 2449 file descriptors") && text.contains("RLIMIT_NOFILE allows 1024"),
        "the error names both numbers:\n{text}"
    );
    Ok(())
}
