//! The processes a test starts. Each is stopped (SIGKILL, by its PID) when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{free_port, http, projector_bin, tansu_bin, test_worker_bin, wait_until};

/// A child process with its output in a log file.
pub struct Service {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn start(name: &str, mut command: Command, log: &Path) -> Result<Service> {
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Service {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited with {status}; log:\n{}",
                    self.name,
                    tail(&self.log(), 4000)
                );
            }
        }
        Ok(())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the process (by PID) without waiting.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("process already stopped")?;
        let mut status = None;
        wait_until(&format!("{} to exit", self.name), timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        })?;
        self.child = None;
        Ok(status.expect("set when the wait succeeded"))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `max` bytes of `text`, on a character boundary.
pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn wait_for_port(service: &mut Service, port: u16) -> Result<()> {
    let address = format!("127.0.0.1:{port}");
    let mut last = Ok(());
    wait_until(
        &format!("{} on {address}", service.name),
        Duration::from_secs(30),
        || {
            last = service.check_alive();
            last.is_err() || std::net::TcpStream::connect(&address).is_ok()
        },
    )?;
    last
}

/// A Tansu broker (memory storage) on a loopback port.
pub struct Broker {
    /// The broker process.
    pub service: Service,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    /// Starts a broker; logs go to `dir`.
    pub fn start(dir: &Path) -> Result<Broker> {
        Self::start_at(dir, free_port())
    }

    /// Kills this broker (its memory storage is lost) and starts a new, empty one
    /// on the same port.
    pub fn replace(&mut self) -> Result<()> {
        self.service.kill();
        *self = Self::start_at(&self.dir, self.port)?;
        Ok(())
    }

    fn start_at(dir: &Path, port: u16) -> Result<Broker> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(tansu_bin());
        command
            .arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .env("RUST_LOG", "warn");
        let mut service = Service::start("tansu", command, &dir.join("tansu.log"))?;
        wait_for_port(&mut service, port)?;
        Ok(Broker {
            service,
            port,
            dir: dir.to_owned(),
        })
    }

    /// `127.0.0.1:<port>`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a topic with `partitions` partitions and infinite retention.
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        let output = Command::new(tansu_bin())
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--partitions")
            .arg(partitions.to_string())
            .args(["--config", "retention.ms=-1"])
            .arg(name)
            .output()?;
        if !output.status.success() {
            bail!(
                "creating topic {name}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

/// `projector registry` on a loopback port.
pub struct Registry {
    /// The registry process.
    pub service: Service,
    port: u16,
}

impl Registry {
    /// Starts an in-memory registry; logs go to `dir`.
    pub fn start(dir: &Path) -> Result<Registry> {
        Self::start_at(dir, free_port(), None)
    }

    /// Starts a registry on `port`, persisted in `data` when given.
    pub fn start_at(dir: &Path, port: u16, data: Option<&Path>) -> Result<Registry> {
        let mut command = Command::new(projector_bin());
        command
            .arg("registry")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        if let Some(data) = data {
            command.arg("--data").arg(data);
        }
        let mut service = Service::start("projector registry", command, &dir.join("registry.log"))?;
        wait_for_port(&mut service, port)?;
        Ok(Registry { service, port })
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// `projector run` with a config written by the test.
pub struct Worker {
    /// The worker process.
    pub service: Service,
    port: u16,
    config: PathBuf,
    /// The binary and the verb before `--config` (`run` for `projector`).
    program: (PathBuf, Option<&'static str>),
}

impl Worker {
    /// Writes the config (`{HTTP_LISTEN}` in it becomes a free port) and starts the
    /// worker; waits until its HTTP API answers.
    pub fn start(dir: &Path, config_text: &str) -> Result<Worker> {
        Self::start_program(dir, config_text, (projector_bin(), Some("run")))
    }

    /// Like [`Worker::start`], with the test-only worker binary, which knows two
    /// more projection kinds, `panic_on_marker` and `slow_order_summary` (see
    /// `tests/bin/test_worker.rs`).
    pub fn start_test_worker(dir: &Path, config_text: &str) -> Result<Worker> {
        Self::start_program(dir, config_text, (test_worker_bin(), None))
    }

    /// Like [`Worker::start`], with another build of `projector` (the bench's A/B
    /// mode).
    pub fn start_binary(dir: &Path, config_text: &str, binary: &Path) -> Result<Worker> {
        Self::start_program(dir, config_text, (binary.to_owned(), Some("run")))
    }

    fn start_program(
        dir: &Path,
        config_text: &str,
        program: (PathBuf, Option<&'static str>),
    ) -> Result<Worker> {
        let port = free_port();
        let config = dir.join("projector.toml");
        std::fs::write(
            &config,
            config_text.replace("{HTTP_LISTEN}", &format!("127.0.0.1:{port}")),
        )?;
        Self::start_with(dir, config, port, program)
    }

    fn start_with(
        dir: &Path,
        config: PathBuf,
        port: u16,
        program: (PathBuf, Option<&'static str>),
    ) -> Result<Worker> {
        let mut command = Command::new(&program.0);
        command
            .args(program.1)
            .arg("--config")
            .arg(&config)
            .current_dir(crate::repo_root())
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn");
        let mut service = Service::start("projector run", command, &dir.join("worker.log"))?;
        wait_for_port(&mut service, port)?;
        Ok(Worker {
            service,
            port,
            config,
            program,
        })
    }

    /// Starts the same worker again (same config, same data) after it stopped.
    pub fn restart(&mut self, dir: &Path) -> Result<()> {
        self.service.kill();
        let again = Self::start_with(dir, self.config.clone(), self.port, self.program.clone())?;
        *self = again;
        Ok(())
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// GET `path`; the status and the JSON body.
    pub fn get(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        let response = http().get(format!("{}{path}", self.url())).send()?;
        let status = response.status().as_u16();
        let body = response.json().unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// POST `path` with `Authorization: Bearer <token>` when a token is given.
    pub fn post(&self, path: &str, token: Option<&str>) -> Result<(u16, serde_json::Value)> {
        let mut request = http().post(format!("{}{path}", self.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send()?;
        let status = response.status().as_u16();
        Ok((status, response.json().unwrap_or(serde_json::Value::Null)))
    }

    /// DELETE `path` with `Authorization: Bearer <token>`.
    pub fn delete(&self, path: &str, token: &str) -> Result<(u16, serde_json::Value)> {
        let response = http()
            .delete(format!("{}{path}", self.url()))
            .bearer_auth(token)
            .send()?;
        let status = response.status().as_u16();
        Ok((status, response.json().unwrap_or(serde_json::Value::Null)))
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The Prometheus text of `GET /metrics`.
    pub fn metrics(&self) -> Result<String> {
        Ok(http().get(format!("{}/metrics", self.url())).send()?.text()?)
    }

    /// The projection's description from `GET /projections/{name}`.
    pub fn projection(&self, name: &str) -> Result<serde_json::Value> {
        let (status, body) = self.get(&format!("/projections/{name}"))?;
        if status != 200 {
            bail!("GET /projections/{name}: {status} {body}");
        }
        Ok(body)
    }

    /// Sum of the projection's committed next offsets over all partitions.
    pub fn applied_offsets(&self, name: &str) -> Result<i64> {
        let body = self.projection(name)?;
        Ok(body["offsets"]
            .as_object()
            .map(|o| o.values().filter_map(|v| v.as_i64()).sum())
            .unwrap_or(0))
    }
}
