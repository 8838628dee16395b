//! Hostile input over HTTP never gets a 500 or a panic: keys with `/`, `..`,
//! percent-encoding, NUL, unicode and 60-64 KB read back right or answer 404/414;
//! bad scan limits answer 400 and huge ones are capped; malformed admin bodies
//! answer 400/413/415/422 and start nothing; wrong tokens (a prefix of the right
//! one, the right one plus a byte) answer 401 and change nothing; unknown
//! projections answer 404 on every route. Requests go over raw TCP so that no
//! client normalises `..` or re-encodes the path. Afterwards the worker still
//! runs, answers /healthz, listens on loopback only and logged no panic.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use projector_tests::{
    assert_state_matches_oracle, orders, produce, wait_applied, wait_until, worker_config, write_events,
    Broker, Registry, Worker,
};
use serde_json::{json, Value};

const TOKEN: &str = "hostile-admin-token-4f9c";

/// `MAX_SCAN_LIMIT` in engine/src/serve.rs.
const MAX_SCAN_LIMIT: usize = 1000;

/// Order ids that exist in the state, each one hostile in a URL.
const HOSTILE_KEYS: &[&str] = &[
    "tenant/eu/order-1",
    "/leading/slash",
    "trailing/",
    "a%2Fb",
    "100%",
    "..",
    "../../etc/passwd",
    "ключ-ü-🚀",
    "with space & ?query=1 #fragment",
    "nul\u{0}byte",
    "back\\slash",
    "+plus+",
];

/// A status and body read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The `error` of a JSON error answer, or "" when the body is not one.
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// Sends `head` (request line and headers, without the blank line) and `body`
/// exactly as given, on a fresh connection that the server closes after answering.
fn send(worker: &Worker, head: &[u8], body: &[u8]) -> Result<Answer> {
    let address = worker.url().trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut request = head.to_vec();
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    request.extend_from_slice(body);
    // The server may answer and close before it read everything (a URI or
    // header over its limit); what it answered is still there to read.
    let _ = stream.write_all(&request);
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e).context("reading the answer");
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no end of headers in {:?}", String::from_utf8_lossy(&raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    ensure!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "answers here have a length: {head}"
    );
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&raw[split + 4..]).into_owned(),
    })
}

/// A request with `target` sent as it is, no body.
fn request(worker: &Worker, method: &str, target: &str, headers: &[(&str, &str)]) -> Result<Answer> {
    request_with_body(worker, method, target, headers, b"")
}

fn request_with_body(
    worker: &Worker,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1");
    for (name, value) in headers {
        head.push_str(&format!("\r\n{name}: {value}"));
    }
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("\r\nContent-Length: {}", body.len()));
    }
    send(worker, head.as_bytes(), body)
}

/// Percent-encodes every byte but the unreserved ones (and `/` when `keep_slash`).
fn encode(key: &str, keep_slash: bool) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An `OrderPlaced` of order `id` on topic `orders`.
fn placed(id: &str, n: i64) -> Value {
    json!({"topic": "orders", "key": id, "type": "OrderPlaced", "value": {
        "orderId": id, "customerId": "customer-hostile",
        "items": [{"sku": "sku-1", "qty": 1, "priceCents": 100 + n}],
        "totalCents": 100 + n, "currency": "EUR", "placedAt": 1_700_000_000_000_i64 + n}})
}

#[test]
fn hostile_http_input_never_gets_a_500_and_the_worker_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    // Replays capped at 100 events/s, so the one started below is still running
    // while the test refuses, repeats and aborts it.
    let mut config = worker_config(
        &broker,
        &registry,
        &dir.path().join("data"),
        "[[projections]]\nname = \"order_summary\"\nkind = \"order_summary\"\ntopics = [\"orders\"]\n",
    )
    .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"));
    config.push_str("[replay]\nmax_events_per_second = 100\n");
    let mut worker = Worker::start(dir.path(), &config)?;

    // More orders than one scan may return, plus the hostile keys.
    let stream = orders::generate("orders", MAX_SCAN_LIMIT + 100, 81);
    let hostile: Vec<Value> = HOSTILE_KEYS
        .iter()
        .enumerate()
        .map(|(n, id)| placed(id, n as i64))
        .collect();
    let mut lines = stream.lines.clone();
    lines.extend(hostile.iter().cloned());
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &lines)?,
    )?;
    wait_applied(&mut worker, "order_summary", lines.len(), Duration::from_secs(60))?;
    assert_state_matches_oracle(&worker, &stream)?;

    hostile_keys_read_back_or_miss(&worker, &orders::oracle(&hostile))?;
    scan_limits_are_checked_and_capped(&worker, &orders::oracle(&hostile))?;
    unknown_projections_are_404_on_every_route(&worker)?;
    admin_refuses_wrong_tokens_and_bodies(&worker)?;
    protocol_garbage_is_refused(&worker)?;

    worker.service.check_alive()?;
    let health = request(&worker, "GET", "/healthz", &[])?;
    ensure!(
        health.status == 200 && health.body == "ok\n",
        "/healthz: {health:?}"
    );
    let log = worker.service.log();
    ensure!(!log.contains("panicked"), "the worker panicked:\n{log}");
    listens_on_loopback_only(&worker, &log)
}

/// Keys that exist read back equal to the oracle however they are spelled in the
/// URL; keys that do not exist answer 404 with a JSON error, invalid UTF-8 400.
fn hostile_keys_read_back_or_miss(worker: &Worker, expected: &BTreeMap<String, Value>) -> Result<()> {
    let state = |target: &str| {
        request(
            worker,
            "GET",
            &format!("/projections/order_summary/state/{target}"),
            &[],
        )
    };
    let mut spellings: Vec<(String, &str)> = Vec::new();
    for key in HOSTILE_KEYS {
        spellings.push((encode(key, false), key));
        spellings.push((encode(key, true), key));
    }
    // Raw, as a client that does not normalise or encode would send them.
    for key in [
        "tenant/eu/order-1",
        "..",
        "../../etc/passwd",
        "100%",
        "+plus+",
        "ключ-ü-🚀",
    ] {
        spellings.push((key.to_owned(), key));
    }
    spellings.push(("100%25".into(), "100%"));
    spellings.push(("a%252Fb".into(), "a%2Fb"));
    spellings.push(("%2E%2E".into(), ".."));
    for (target, key) in &spellings {
        let answer = state(target)?;
        let mut got = answer.json();
        let as_of = got.as_object_mut().and_then(|fields| fields.remove("as_of"));
        ensure!(
            answer.status == 200 && as_of.is_some_and(|a| a.is_object()) && Some(&got) == expected.get(*key),
            "GET state/{target} (key {key:?}): {} {}\n  want {:?}",
            answer.status,
            answer.body,
            expected.get(*key)
        );
    }

    let sixty_kb = "k".repeat(60_000);
    let missing = [
        "a%2Fb",              // decodes to a/b; the stored key is the literal a%2Fb
        "tenant%2Feu",        // a prefix of a stored key
        "tenant/eu/order-1/", // a stored key and more
        "nul%00",             // a prefix of nul\0byte, up to the NUL
        "%00",
        "%2e%2e%2f%2e%2e",
        "%zz",
        "%",
        sixty_kb.as_str(),
    ];
    for target in missing {
        let answer = state(target)?;
        ensure!(
            answer.status == 404 && answer.error().contains("no state for key"),
            "GET state/{}: {} {}",
            &target[..target.len().min(40)],
            answer.status,
            &answer.body[..answer.body.len().min(200)]
        );
    }
    for target in ["%FF", "%C3%28", "ok%ED%A0%80"] {
        let answer = state(target)?;
        ensure!(
            answer.status == 400 && answer.error().contains("UTF-8"),
            "GET state/{target}: {answer:?}"
        );
    }

    // Over hyper's URI limit (64 KiB): refused before any handler runs.
    let answer = state(&"k".repeat(64 * 1024))?;
    ensure!(
        answer.status == 414,
        "a 64 KiB key: {} {}",
        answer.status,
        answer.body
    );
    Ok(())
}

/// `limit` past the cap returns the cap; values that are not a count answer 400
/// naming `limit`; hostile prefixes and cursors are plain strings.
fn scan_limits_are_checked_and_capped(worker: &Worker, hostile: &BTreeMap<String, Value>) -> Result<()> {
    let scan = |query: &str| {
        request(
            worker,
            "GET",
            &format!("/projections/order_summary/state?{query}"),
            &[],
        )
    };
    for (query, want) in [
        ("limit=1000000000", MAX_SCAN_LIMIT),
        ("limit=18446744073709551615", MAX_SCAN_LIMIT),
        ("limit=0", 1),
        ("limit=7", 7),
        ("", 100),
    ] {
        let answer = scan(query)?;
        let page = answer.json();
        let items = page["items"].as_array().map(Vec::len);
        ensure!(
            answer.status == 200 && items == Some(want) && page["next"].is_string(),
            "scan ?{query}: {} {items:?} items, next {}",
            answer.status,
            page["next"]
        );
    }
    for query in [
        "limit=-1",
        "limit=abc",
        "limit=1e3",
        "limit=18446744073709551616",
        "limit=",
        "limit=1&limit=2",
    ] {
        let answer = scan(query)?;
        ensure!(
            answer.status == 400 && answer.error().contains("limit"),
            "scan ?{query}: {answer:?}"
        );
    }

    let page = scan("prefix=tenant%2F")?.json();
    ensure!(
        page["items"] == json!([{"key": "tenant/eu/order-1", "value": hostile["tenant/eu/order-1"]}]),
        "scan ?prefix=tenant/: {page}"
    );
    let page = scan("prefix=nul%00")?.json();
    ensure!(
        page["items"][0]["key"] == "nul\u{0}byte" && page["items"].as_array().map(Vec::len) == Some(1),
        "scan ?prefix=nul\\0: {page}"
    );
    let long = "p".repeat(60_000);
    for query in [
        "prefix=%FF%FE".to_owned(),
        "after=%FF&prefix=%00%00".to_owned(),
        format!("prefix={long}"),
        format!("after={long}&limit=3"),
    ] {
        let answer = scan(&query)?;
        ensure!(
            answer.status == 200 && answer.json()["items"].is_array(),
            "scan ?{}: {} {}",
            &query[..query.len().min(40)],
            answer.status,
            answer.body
        );
    }
    Ok(())
}

fn unknown_projections_are_404_on_every_route(worker: &Worker) -> Result<()> {
    let bearer = format!("Bearer {TOKEN}");
    for (name, shown) in [
        ("nope", "nope"),
        ("no%2Fpe", "no/pe"),
        ("g%C3%BCst", "güst"),
        ("..", ".."),
    ] {
        for (method, route) in [
            ("GET", ""),
            ("GET", "/state"),
            ("GET", "/state/k"),
            ("GET", "/state/a/b"),
            ("POST", "/resume"),
            ("POST", "/skip"),
            ("POST", "/replay"),
            ("DELETE", "/replay"),
        ] {
            let target = format!("/projections/{name}{route}");
            let answer = request(worker, method, &target, &[("Authorization", &bearer)])?;
            ensure!(
                answer.status == 404 && answer.error().contains(&format!("no projection named `{shown}`")),
                "{method} {target}: {answer:?}"
            );
        }
    }
    let answer = request(worker, "GET", "/projections/%FF/state/k", &[])?;
    ensure!(
        answer.status == 400 && answer.error().contains("UTF-8"),
        "a name that is not UTF-8: {answer:?}"
    );
    Ok(())
}

/// The live generation and the running replay's generation (if any).
fn generations(worker: &Worker) -> Result<(u64, Option<u64>)> {
    let description = worker.projection("order_summary")?;
    let live = description["generation"]
        .as_u64()
        .with_context(|| format!("a generation: {description}"))?;
    Ok((live, description["replay"]["generation"].as_u64()))
}

fn admin_refuses_wrong_tokens_and_bodies(worker: &Worker) -> Result<()> {
    let routes = [
        ("POST", "/projections/order_summary/resume"),
        ("POST", "/projections/order_summary/skip"),
        ("POST", "/projections/order_summary/replay"),
        ("DELETE", "/projections/order_summary/replay"),
    ];
    let short = &TOKEN[..TOKEN.len() - 1];
    let wrong: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("Authorization", "Bearer".into())],
        vec![("Authorization", "Bearer wrong".into())],
        vec![("Authorization", format!("Bearer {short}"))],
        vec![("Authorization", format!("Bearer {TOKEN}x"))],
        vec![("Authorization", format!("Bearer {TOKEN}\u{e9}"))],
        vec![("Authorization", TOKEN.into())],
        vec![("Authorization", format!("Basic {TOKEN}"))],
        vec![("X-Admin-Token", TOKEN.into())],
        // A malformed body does not get past the token check either.
        vec![("Content-Type", "application/json".into())],
    ];
    for (method, route) in routes {
        for headers in &wrong {
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let answer = request_with_body(worker, method, route, &pairs, b"{")?;
            ensure!(
                answer.status == 401
                    && answer.error() == "missing or wrong admin token"
                    && !answer.body.contains(short),
                "{method} {route} with {headers:?}: {answer:?}"
            );
        }
        // The token in the query string is not a token.
        let answer = request(worker, method, &format!("{route}?token={TOKEN}"), &[])?;
        ensure!(answer.status == 401, "{method} {route}?token=: {answer:?}");
    }
    ensure!(generations(worker)? == (1, None), "wrong tokens changed nothing");

    // The right token with bodies the endpoints do not take.
    let bearer = format!("Bearer {TOKEN}");
    let with =
        |content_type: &'static str| vec![("Authorization", bearer.as_str()), ("Content-Type", content_type)];
    // Headers, body, and the status it gets.
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>, u16);
    let bodies: Vec<Case> = vec![
        (with("application/json"), b"{".to_vec(), 400),
        (with("application/json"), b"{\"a\": 1,}".to_vec(), 400),
        (with("application/json"), b"\"\xff\xfe\"".to_vec(), 400),
        (with("application/json"), b"{\"from_offset\": 5}".to_vec(), 422),
        (with("application/json"), b"[1, 2]".to_vec(), 422),
        (with("application/json"), b"null".to_vec(), 422),
        (with("text/plain"), b"{}".to_vec(), 415),
        (
            with("application/x-www-form-urlencoded"),
            b"from_offset=5".to_vec(),
            415,
        ),
        (vec![("Authorization", bearer.as_str())], b"{}".to_vec(), 415),
        (with("application/json"), vec![b' '; 8 * 1024], 413),
        (
            vec![
                ("Authorization", bearer.as_str()),
                ("Content-Type", "application/json"),
                ("Content-Length", "1000000000"),
            ],
            Vec::new(),
            413,
        ),
    ];
    for (method, route) in routes {
        for (headers, body, want) in &bodies {
            let answer = request_with_body(worker, method, route, headers, body)?;
            ensure!(
                answer.status == *want && answer.error().contains("admin requests take no body"),
                "{method} {route} with {headers:?} and {:?}: {answer:?}, want {want}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
        }
    }
    ensure!(
        generations(worker)? == (1, None),
        "refused bodies changed nothing"
    );

    // The right token: nothing is stopped, no replay runs.
    let admin = |method: &str, route: &str, body: &[u8]| {
        let content = if body.is_empty() {
            "text/plain"
        } else {
            "application/json"
        };
        request_with_body(
            worker,
            method,
            route,
            &[("Authorization", bearer.as_str()), ("Content-Type", content)],
            body,
        )
    };
    for (method, route, body, want, says) in [
        ("POST", routes[0].1, &b"{}"[..], 409, "is not stopped"),
        (
            "POST",
            routes[1].1,
            &b""[..],
            409,
            "is not stopped on a poison event",
        ),
        (
            "DELETE",
            routes[3].1,
            &b" \r\n"[..],
            404,
            "no replay of `order_summary` is running",
        ),
    ] {
        let answer = admin(method, route, body)?;
        ensure!(
            answer.status == want && answer.error().contains(says),
            "{method} {route}: {answer:?}"
        );
    }
    // The auth scheme is case-insensitive.
    let lower = format!("bearer {TOKEN}");
    let answer = request(worker, "POST", routes[0].1, &[("Authorization", &lower)])?;
    ensure!(answer.status == 409, "lowercase `bearer`: {answer:?}");
    // A replay starts, a second is refused, wrong tokens cannot abort it, the
    // right one does.
    let answer = admin("POST", routes[2].1, b"{}")?;
    ensure!(
        answer.status == 202 && answer.json()["replay"]["generation"] == 2,
        "start a replay: {answer:?}"
    );
    let answer = admin("POST", routes[2].1, b"")?;
    ensure!(
        answer.status == 409
            && answer.error().contains("running already")
            && answer.json()["replay"]["generation"] == 2,
        "a second replay: {answer:?}"
    );
    for headers in &wrong {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = request(worker, "DELETE", routes[3].1, &pairs)?;
        ensure!(answer.status == 401, "abort with {headers:?}: {answer:?}");
    }
    ensure!(generations(worker)? == (1, Some(2)), "the replay still runs");
    let answer = admin("DELETE", routes[3].1, b"")?;
    ensure!(
        answer.status == 202 && answer.json()["aborting"] == 2,
        "abort: {answer:?}"
    );
    wait_until("the aborted replay to end", Duration::from_secs(20), || {
        generations(worker).is_ok_and(|g| g == (1, None))
    })?;
    let answer = admin("DELETE", routes[3].1, b"")?;
    ensure!(answer.status == 404, "nothing left to abort: {answer:?}");
    Ok(())
}

/// Requests that are not HTTP, or too large to be, are refused by the server.
fn protocol_garbage_is_refused(worker: &Worker) -> Result<()> {
    // Well over hyper's 408 KB header buffer (a header a little over it can still
    // pass when it arrives in a single read).
    let huge_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}",
        "h".repeat(1024 * 1024)
    );
    let cases: Vec<(Vec<u8>, &[u16])> = vec![
        (b"GARBAGE".to_vec(), &[400]),
        (b"GET /healthz HTTP/9.9".to_vec(), &[400, 505]),
        // An origin-form target without its slash: hyper takes it as an authority.
        (b"GET projections HTTP/1.1\r\nHost: x".to_vec(), &[400, 404]),
        (huge_header.into_bytes(), &[431]),
        (
            b"GET /projections/order_summary/state/a\x00b HTTP/1.1\r\nHost: x".to_vec(),
            &[400],
        ),
        (
            b"PUT /projections/order_summary/replay HTTP/1.1\r\nHost: x".to_vec(),
            &[405],
        ),
    ];
    for (head, statuses) in cases {
        let answer = send(worker, &head, b"")?;
        ensure!(
            statuses.contains(&answer.status),
            "{:?}: {answer:?}, want one of {statuses:?}",
            String::from_utf8_lossy(&head[..head.len().min(60)])
        );
    }
    Ok(())
}

/// The worker logged the address it listens on, and the kernel shows its socket
/// bound to 127.0.0.1, not to every interface. (The default `http.listen` is
/// 127.0.0.1:8080: `minimal_config_gets_documented_defaults` in engine/src/config.rs.)
fn listens_on_loopback_only(worker: &Worker, log: &str) -> Result<()> {
    let port: u16 = worker
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the worker's port")?;
    // The log goes to a file, not a terminal: no colour codes in it.
    ensure!(
        !log.contains('\u{1b}'),
        "terminal escape codes in a log file:\n{log}"
    );
    ensure!(
        log.contains(&format!("worker started listen=127.0.0.1:{port}")),
        "the worker logs its address:\n{log}"
    );
    if cfg!(target_os = "linux") {
        let mut listening = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let Some((address, local_port)) = fields.get(1).and_then(|f| f.split_once(':')) else {
                    continue;
                };
                if fields.get(3) == Some(&"0A") && u16::from_str_radix(local_port, 16).ok() == Some(port) {
                    listening.push(address.to_owned());
                }
            }
        }
        // /proc/net/tcp writes IPv4 addresses as a little-endian u32 in hex.
        if listening != ["0100007F"] {
            bail!("port {port} listens on {listening:?}, want only 127.0.0.1 (0100007F)");
        }
    }
    Ok(())
}
