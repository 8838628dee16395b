//! The HTTP listener: accepting connections under hostile clients.
//!
//! Every connection holds a file descriptor, which the worker shares with RocksDB
//! and librdkafka, so the listener bounds what a client can hold:
//!
//! - **A connection cap** (`http.max_connections`). Connections are accepted as
//!   they come, so the kernel's queue never fills; at the cap, the connection that
//!   has waited longest without a request in progress (one that never finished its
//!   headers, or sits idle between requests) is closed to make room. Only when
//!   every connection is in the middle of a request is the new one refused. A flood
//!   of slow or idle connections thus costs at most the cap in descriptors and
//!   never keeps a well-behaved client out.
//! - **A header timeout** (`http.header_timeout_ms`): from accept (and the TLS
//!   handshake) to the end of the first request's headers.
//! - **An idle timeout** (`http.idle_timeout_ms`): from the end of a response to
//!   the end of the next request's headers on a kept-alive connection.
//! - **A request timeout** (`http.request_timeout_ms`): a request whose answer
//!   takes longer is answered 503.
//!
//! With `http.tls`, connections are TLS (rustls); a client speaking plain HTTP
//! fails the handshake and is closed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

/// How long a connection may take at each stage, and how many there may be.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From accept to the end of the first request's headers.
    pub header_timeout: Duration,
    /// From the end of a response to the end of the next request's headers.
    pub idle_timeout: Duration,
    /// From a request's headers to its answer.
    pub request_timeout: Duration,
    /// Connections held at once.
    pub max_connections: usize,
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted: in the TLS handshake or reading its first request's headers.
    Opening,
    /// A request is being answered.
    Busy,
    /// Between a response and the next request's headers.
    Idle,
}

struct Slot {
    phase: Phase,
    since: Instant,
    close: Arc<Notify>,
}

/// The connections held, shared by the accept loop, the connections and the
/// sweeper that enforces the timeouts.
#[derive(Default)]
struct Connections {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    slots: HashMap<u64, Slot>,
}

impl Connections {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes room for one more connection (closing the longest-waiting one that
    /// is not answering a request when at `max`) and registers it; `None` when
    /// every connection is answering a request.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Notify>)> {
        let mut table = self.table();
        if table.slots.len() >= max {
            let victim = table
                .slots
                .iter()
                .filter(|(_, slot)| slot.phase != Phase::Busy)
                .min_by_key(|(_, slot)| slot.since)
                .map(|(id, _)| *id)?;
            if let Some(slot) = table.slots.remove(&victim) {
                slot.close.notify_one();
                crate::metrics::http_connection("evicted");
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let close = Arc::new(Notify::new());
        table.slots.insert(
            id,
            Slot {
                phase: Phase::Opening,
                since: Instant::now(),
                close: close.clone(),
            },
        );
        Some((id, close))
    }

    fn set(&self, id: u64, phase: Phase) {
        if let Some(slot) = self.table().slots.get_mut(&id) {
            slot.phase = phase;
            slot.since = Instant::now();
        }
    }

    fn remove(&self, id: u64) {
        self.table().slots.remove(&id);
    }

    /// Closes the connections that waited past their stage's timeout.
    fn sweep(&self, limits: &Limits) {
        let now = Instant::now();
        self.table().slots.retain(|_, slot| {
            let limit = match slot.phase {
                Phase::Opening => limits.header_timeout,
                Phase::Idle => limits.idle_timeout,
                Phase::Busy => return true,
            };
            let expired = now.duration_since(slot.since) >= limit;
            if expired {
                slot.close.notify_one();
                crate::metrics::http_connection("timed_out");
            }
            !expired
        });
    }

    fn len(&self) -> usize {
        self.table().slots.len()
    }
}

/// Removes a connection from the table however its task ends.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.remove(self.id);
    }
}

/// The shared pieces every connection task needs.
#[derive(Clone)]
struct Shared {
    router: Router,
    connections: Arc<Connections>,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    draining: watch::Receiver<bool>,
}

/// Serves `router` on `listener` under `limits` (over TLS with `tls`) until
/// `shutdown` completes; then stops accepting, lets requests in progress finish
/// (within the request timeout) and closes the rest.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let connections = Arc::new(Connections::default());
    let (drain, draining) = watch::channel(false);
    let shared = Shared {
        router,
        connections: connections.clone(),
        limits: limits.clone(),
        tls,
        draining,
    };
    let stopped = Arc::new(AtomicBool::new(false));
    let sweeper = {
        let (connections, limits, stopped) = (connections.clone(), limits.clone(), stopped.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                connections.sweep(&limits);
            }
        })
    };
    let mut accept_errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                accept_errors.recovered();
                let Some((id, close)) = connections.admit(limits.max_connections) else {
                    // Every connection is answering a request: refuse this one.
                    crate::metrics::http_connection("refused");
                    continue;
                };
                crate::metrics::http_connection("accepted");
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _registered = Registered {
                        connections: shared.connections.clone(),
                        id,
                    };
                    connection(stream, id, close, shared).await;
                });
            }
            Err(error) => {
                accept_errors.failed(&error);
                // Out of descriptors: give closing connections a moment rather
                // than spinning on accept.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(listener);
    let _ = drain.send(true);
    let deadline = Instant::now() + limits.request_timeout + Duration::from_secs(1);
    while connections.len() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stopped.store(true, Ordering::Relaxed);
    sweeper.abort();
}

/// Accept errors (out of descriptors, mostly) are logged when they start, then
/// once a minute with a count, and when they stop: never once per attempt.
#[derive(Default)]
struct AcceptErrors {
    failing_since: Option<Instant>,
    last_logged: Option<Instant>,
    count: u64,
}

impl AcceptErrors {
    fn failed(&mut self, error: &std::io::Error) {
        crate::metrics::http_connection("accept_error");
        self.count += 1;
        let now = Instant::now();
        self.failing_since.get_or_insert(now);
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
        {
            tracing::warn!(%error, failures = self.count, "cannot accept HTTP connections");
            self.last_logged = Some(now);
        }
    }

    fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                failures = self.count,
                after_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                "accepting HTTP connections again"
            );
            self.count = 0;
            self.last_logged = None;
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, id: u64, close: Arc<Notify>, shared: Shared) {
    let _ = stream.set_nodelay(true);
    match shared.tls.clone() {
        None => http(TokioIo::new(stream), id, close, shared).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                handshake = acceptor.accept(stream) => handshake,
                () = close.notified() => return,
            };
            match handshake {
                Ok(stream) => http(TokioIo::new(stream), id, close, shared).await,
                Err(error) => tracing::debug!(%error, "TLS handshake failed"),
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it, the sweeper or
/// the cap closes it, or the worker drains.
async fn http<I>(io: I, id: u64, close: Arc<Notify>, shared: Shared)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connections = shared.connections.clone();
    let router = shared.router.clone();
    let request_timeout = shared.limits.request_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (connections, router) = (connections.clone(), router.clone());
        async move {
            connections.set(id, Phase::Busy);
            let answer = tokio::time::timeout(request_timeout, router.oneshot(request.map(Body::new))).await;
            connections.set(id, Phase::Idle);
            Ok::<_, std::convert::Infallible>(match answer {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => timed_out(request_timeout),
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = shared.draining.clone();
    tokio::select! {
        _ = conn.as_mut() => return,
        () = close.notified() => return,
        _ = draining.wait_for(|d| *d) => {}
    }
    // Draining: finish the request in progress, take no new one.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        () = close.notified() => {}
    }
}

fn timed_out(limit: Duration) -> Response<Body> {
    let body = serde_json::json!({
        "error": format!("the request took longer than http.request_timeout_ms = {}", limit.as_millis())
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A TLS acceptor for the PEM certificate chain and private key in these files;
/// the error names the file and what is wrong with it.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("http.tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("http.tls.cert {}: no certificate in it", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("http.tls.key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("http.tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("http.tls ({} and {}): {e}", cert.display(), key.display()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(50),
            idle_timeout: Duration::from_millis(100),
            request_timeout: Duration::from_secs(1),
            max_connections: max,
        }
    }

    #[test]
    fn at_the_cap_the_longest_waiting_connection_not_answering_makes_room() {
        let connections = Connections::default();
        let (busy, _) = connections.admit(2).unwrap();
        connections.set(busy, Phase::Busy);
        let (waiting, waiting_close) = connections.admit(2).unwrap();
        let (third, _) = connections.admit(2).unwrap();
        assert_eq!(connections.len(), 2);
        // The busy one stays; the one waiting for headers was closed.
        let ids: Vec<u64> = connections.table().slots.keys().copied().collect();
        assert!(ids.contains(&busy) && ids.contains(&third) && !ids.contains(&waiting));
        assert!(
            futures_ready(waiting_close.notified()),
            "the evicted connection is told to close"
        );
        connections.set(third, Phase::Busy);
        assert!(
            connections.admit(2).is_none(),
            "every connection is answering: refused"
        );
    }

    #[test]
    fn the_sweeper_closes_what_waited_past_its_timeout() {
        let connections = Connections::default();
        let limits = limits(10);
        let (opening, _) = connections.admit(10).unwrap();
        let (idle, _) = connections.admit(10).unwrap();
        let (busy, _) = connections.admit(10).unwrap();
        connections.set(idle, Phase::Idle);
        connections.set(busy, Phase::Busy);
        std::thread::sleep(Duration::from_millis(60));
        connections.sweep(&limits);
        let left: Vec<u64> = connections.table().slots.keys().copied().collect();
        assert!(!left.contains(&opening), "past the header timeout");
        assert!(left.contains(&idle) && left.contains(&busy));
        std::thread::sleep(Duration::from_millis(60));
        connections.sweep(&limits);
        let left: Vec<u64> = connections.table().slots.keys().copied().collect();
        assert_eq!(
            left,
            vec![busy],
            "past the idle timeout; a request in progress stays"
        );
    }

    /// Whether `future` is ready on its first poll.
    fn futures_ready<F: Future>(future: F) -> bool {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        future.as_mut().poll(&mut context).is_ready()
    }
}
