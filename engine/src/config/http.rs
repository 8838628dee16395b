//! `[http]`: where the API listens, who may use it, and what a connection may hold.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// `[http]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the HTTP API listens on. Loopback unless you mean otherwise.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token of the admin endpoints (resume, skip, replay); they are
    /// disabled without one. Prefer `PROJECTOR__HTTP__ADMIN_TOKEN` over the file.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Bearer token, or list of tokens, that every read route requires
    /// (`/projections...`); reads are open without one. The admin token reads
    /// too. Prefer `PROJECTOR__HTTP__READ_TOKEN` over the file.
    #[serde(default)]
    pub read_token: Option<ReadTokens>,
    /// Require a read token on `/healthz`, `/readyz` and `/metrics` as well (they
    /// stay open by default, for probes and scrapers).
    #[serde(default)]
    pub protect_probes: bool,
    /// Milliseconds from accepting a connection (and its TLS handshake) to the end
    /// of its first request's headers; a connection slower than that is closed.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Milliseconds a kept-alive connection may wait between the end of a
    /// response and the end of the next request's headers.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Milliseconds a request may take to be answered; longer ones get 503.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Connections held at once. At the cap the one that has waited longest
    /// without a request in progress is closed to make room; a connection is
    /// refused only when every one is answering a request. Part of the worker's
    /// file-descriptor budget, checked against `RLIMIT_NOFILE` at start.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Key scans (`GET /projections/{name}/state`) run at once; more wait, within
    /// the request timeout.
    #[serde(default = "default_max_concurrent_scans")]
    pub max_concurrent_scans: usize,
    /// Serve HTTPS with this certificate chain and key (PEM files); plain HTTP is
    /// then refused.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `http.tls`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the server's certificate, then its chain.
    pub cert: PathBuf,
    /// PEM file of its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `http.read_token`: one token or several (to rotate them).
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum ReadTokens {
    /// One token.
    One(String),
    /// Any of these.
    Many(Vec<String>),
}

impl ReadTokens {
    /// Every token.
    pub fn all(&self) -> Vec<String> {
        match self {
            ReadTokens::One(token) => vec![token.clone()],
            ReadTokens::Many(tokens) => tokens.clone(),
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field(
                "read_token",
                &self
                    .read_token
                    .as_ref()
                    .map(|t| format!("<{} redacted>", t.all().len())),
            )
            .field("protect_probes", &self.protect_probes)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("max_concurrent_scans", &self.max_concurrent_scans)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            admin_token: None,
            read_token: None,
            protect_probes: false,
            header_timeout_ms: default_header_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            max_connections: default_max_connections(),
            max_concurrent_scans: default_max_concurrent_scans(),
            tls: None,
        }
    }
}

impl HttpConfig {
    /// The read tokens, none meaning reads are open; an empty token is refused by
    /// [`HttpConfig::validate`].
    pub fn read_tokens(&self) -> Vec<String> {
        self.read_token.as_ref().map(ReadTokens::all).unwrap_or_default()
    }

    pub(super) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let positive = [
            ("http.header_timeout_ms", self.header_timeout_ms),
            ("http.idle_timeout_ms", self.idle_timeout_ms),
            ("http.request_timeout_ms", self.request_timeout_ms),
            ("http.max_connections", self.max_connections as u64),
            ("http.max_concurrent_scans", self.max_concurrent_scans as u64),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::at(file, key, "must be at least 1"));
        }
        if let Some(tokens) = &self.read_token {
            let tokens = tokens.all();
            if tokens.is_empty() || tokens.iter().any(|t| t.trim().is_empty()) {
                return Err(ConfigError::at(
                    file,
                    "http.read_token",
                    "a read token must not be empty (remove the key to leave reads open)",
                ));
            }
        }
        Ok(())
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_header_timeout_ms() -> u64 {
    5_000
}

fn default_idle_timeout_ms() -> u64 {
    30_000
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

fn default_max_connections() -> usize {
    512
}

fn default_max_concurrent_scans() -> usize {
    4
}
