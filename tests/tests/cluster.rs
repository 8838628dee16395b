//! Multi-worker mode on real parts: three workers in one group (`[cluster]`) fold
//! `orders` (8 partitions) while a producer writes (`order_summary` folds slowly,
//! 2.5 ms an event, so a partition that moves takes seconds to restore); one is SIGKILLed and
//! restarted, a fourth joins and leaves with SIGTERM. A reader polls every
//! worker throughout: a key once seen never goes missing and never goes back to
//! an older value (each answer is the value or a 503). Once caught up, every key
//! read from every worker equals the oracle, for the entity projection
//! `order_summary` and the declarative entity `order_lines` (routed to the key's
//! partition with the producers' crc32 partitioner), and the cross-partition
//! aggregates `customer_stats` (declarative) and `revenue_by_day` (built-in),
//! merged over every partition; scans on any worker merge every worker's
//! partitions page by page; `min_as_of` waits for an offset or says 503. The
//! cluster view and `projector status` on any worker show every worker and its
//! partitions. Then a replay requested on one worker (`projector replay --wait`)
//! runs on all three while a producer writes and w1 (which received it and
//! coordinates it) is SIGKILLed mid-replay: a
//! second request on another worker gets 409, a reader polling every worker
//! never gets a 404 or an older value, every worker switches, and every key
//! equals the oracle of the whole stream.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::read_models::{self, stamp};
use projector_tests::{
    assert_matches, http, orders, produce_command, projector_bin, wait_until, worker_config, write_events,
    Broker, Registry, Worker,
};
use serde_json::Value;

const SECRET: &str = "cluster-test-secret-0123456789";
const TOKEN: &str = "cluster-admin";

/// Every item of a scan of `projection` on `worker`, `limit` keys a page,
/// following the `next` cursor; values without their `as_of`.
fn scan_all(
    worker: &Worker,
    projection: &str,
    prefix: &str,
    limit: usize,
) -> Result<BTreeMap<String, Value>> {
    let mut items = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/projections/{projection}/state?prefix={prefix}&limit={limit}");
        if let Some(after) = &after {
            path.push_str(&format!("&after={after}"));
        }
        let (status, page) = worker.get(&path)?;
        ensure!(status == 200, "scan {path}: {status} {page}");
        ensure!(
            page["as_of"].as_object().is_some_and(|o| o.len() == 8),
            "a scan's as_of covers every partition: {page}"
        );
        for item in page["items"].as_array().context("items")? {
            let key = item["key"].as_str().context("key")?.to_owned();
            ensure!(
                after.as_ref().is_none_or(|a| key > *a) && !items.contains_key(&key),
                "keys in order, each once: {key} after {after:?}"
            );
            items.insert(key, item["value"].clone());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(items),
        }
    }
}

fn config(broker: &Broker, registry: &Registry, data: &Path, worker_id: &str) -> String {
    let mut projections = String::from(
        "
[[projections]]
name = \"order_summary\"
kind = \"slow_order_summary\"
topics = [\"orders\"]
keyed_like_topic = true
options = { fold_micros = 2500 }
",
    );
    projections.push_str(&read_models::customer_stats_projection("orders"));
    projections.push_str(
        "\n[[projections]]\nname = \"revenue_by_day\"\nkind = \"revenue_by_day\"\ntopics = [\"orders\"]\n",
    );
    projections.push_str(&read_models::order_lines_projection("orders").replace(
        "topics = [\"orders\"]",
        "topics = [\"orders\"]\nkeyed_like_topic = true",
    ));
    // The replay folds at most 50 events a second per worker, so it is still
    // behind the live generation when it comes within the switch distance:
    // switching before it reached the targets would show older values.
    projections.push_str(&format!(
        "
[replay]
max_events_per_second = 50

[cluster]
worker_id = \"{worker_id}\"
advertised_url = \"http://{{HTTP_LISTEN}}\"
secret = \"{SECRET}\"
publish_interval_ms = 500
"
    ));
    worker_config(broker, registry, data, &projections)
        .replace(
            "group_prefix = \"projector-test\"",
            "group_prefix = \"projector-test\"\npartitioner = \"crc32\"",
        )
        .replace(
            "listen = \"{HTTP_LISTEN}\"",
            &format!("listen = \"{{HTTP_LISTEN}}\"\nadmin_token = \"{TOKEN}\""),
        )
}

fn start(dir: &Path, broker: &Broker, registry: &Registry, worker_id: &str) -> Result<(Worker, PathBuf)> {
    let home = dir.join(worker_id);
    std::fs::create_dir_all(&home)?;
    let text = config(broker, registry, &home.join("data"), worker_id);
    Ok((Worker::start_test_worker(&home, &text)?, home))
}

/// Per worker id, per projection: the partitions it serves (`live`), from
/// `GET /projections` on `worker`.
fn live_claims(worker: &Worker) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut claims: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let Ok((200, list)) = worker.get("/projections") else {
        return claims;
    };
    for w in list["cluster"]["workers"].as_array().into_iter().flatten() {
        let id = w["worker_id"].as_str().unwrap_or_default().to_owned();
        let entry = claims.entry(id).or_default();
        for (name, c) in w["projections"].as_object().into_iter().flatten() {
            let live = c["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["state"] == "live")
                .map(|p| format!("{}/{}", p["topic"].as_str().unwrap_or_default(), p["partition"]))
                .collect();
            entry.insert(name.clone(), live);
        }
    }
    claims
}

/// Whether `worker` sees exactly `workers`, which together serve all 8
/// partitions of both projections.
fn sees_settled(worker: &Worker, workers: &[&str]) -> bool {
    let claims = live_claims(worker);
    let ids: Vec<&str> = claims.keys().map(String::as_str).collect();
    ids == workers
        && ["order_summary", "customer_stats"].iter().all(|name| {
            let served: BTreeSet<&String> = claims.values().filter_map(|c| c.get(*name)).flatten().collect();
            served.len() == 8
        })
}

/// What the reader saw: violations, and answers by status.
#[derive(Default)]
struct Seen {
    violations: Vec<String>,
    statuses: BTreeMap<u16, u64>,
    /// Per (projection, key): the last value's progress (order version or order
    /// count), once answered.
    progress: BTreeMap<(String, String), i64>,
}

impl Seen {
    /// No violation `when`, and every one of `keys` polled keys answered.
    fn check(&self, when: &str, keys: usize) -> Result<()> {
        println!("reader answers {when} by status: {:?}", self.statuses);
        ensure!(
            self.violations.is_empty(),
            "{} violations {when}, e.g.\n{}",
            self.violations.len(),
            self.violations
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        ensure!(
            self.progress.len() == keys,
            "every polled key was answered {when}"
        );
        Ok(())
    }
}

/// Polls every worker for `keys` until `stop`: a key once answered never 404s
/// again and its progress never goes down; anything but 200, 404 (before the
/// first answer) and 503 is a violation.
fn poll(
    urls: Arc<Mutex<Vec<String>>>,
    keys: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let client = http();
    while !stop.load(Ordering::Relaxed) {
        let urls = urls.lock().unwrap().clone();
        for url in &urls {
            for (projection, key) in &keys {
                let Ok(response) = client
                    .get(format!("{url}/projections/{projection}/state/{key}"))
                    .send()
                else {
                    continue; // a worker being killed or restarted
                };
                let status = response.status().as_u16();
                let body: Value = response.json().unwrap_or(Value::Null);
                let mut seen = seen.lock().unwrap();
                *seen.statuses.entry(status).or_default() += 1;
                let id = (projection.clone(), key.clone());
                let before = seen.progress.get(&id).copied();
                match status {
                    200 => {
                        let field = if projection == "order_summary" {
                            "version"
                        } else {
                            "orders"
                        };
                        let progress = body[field].as_i64().unwrap_or(-1);
                        if before.is_some_and(|b| progress < b) {
                            seen.violations.push(format!(
                                "{url} {projection}/{key}: {field} went back from {before:?} to {progress}"
                            ));
                        }
                        seen.progress.insert(id, progress.max(before.unwrap_or(progress)));
                    }
                    404 if before.is_none() => {}
                    503 => {
                        if body["error"].as_str().is_none() {
                            seen.violations
                                .push(format!("{url} {projection}/{key}: 503 without an error: {body}"));
                        }
                    }
                    other => seen.violations.push(format!(
                        "{url} {projection}/{key}: {other} {body} (before: {before:?})"
                    )),
                }
            }
        }
    }
}

#[test]
fn any_worker_answers_any_read_while_workers_come_and_go() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 8)?;
    let registry = Registry::start(dir.path())?;
    // The first stream before and while workers come and go; the tail during
    // the replay.
    let first = orders::generate("orders", 700, 19);
    let mut stream = orders::concat(&first, &orders::generate("orders", 200, 20));
    stamp(&mut stream.lines);
    let (early, late) = stream.lines.split_at(first.lines.len());
    let summary_oracle = orders::oracle(early);
    let stats_oracle = read_models::customer_stats(early);
    let revenue_oracle = read_models::revenue_by_day(early);
    let lines_oracle = read_models::order_lines(early);
    // A backlog before the workers start, the rest while they come and go.
    let (backlog, rest) = early.split_at(early.len() / 2);
    let backlog = write_events(dir.path(), "backlog.jsonl", backlog)?;
    let events = write_events(dir.path(), "orders.jsonl", rest)?;
    projector_tests::produce(&broker, &registry, &backlog)?;

    let (mut w1, home1) = start(dir.path(), &broker, &registry, "w1")?;
    let (mut w2, home2) = start(dir.path(), &broker, &registry, "w2")?;
    let (w3, home3) = start(dir.path(), &broker, &registry, "w3")?;
    wait_until(
        "three workers to share the partitions",
        Duration::from_secs(90),
        || {
            [&w1, &w2, &w3]
                .iter()
                .all(|w| sees_settled(w, &["w1", "w2", "w3"]))
        },
    )
    .with_context(|| format!("claims seen by w1: {:?}", live_claims(&w1)))?;

    // Requests between workers need the secret.
    let internal = format!(
        "{}/cluster/projections/order_summary/partials?key=k&partitions=orders/0",
        w1.url()
    );
    let refused = http().get(&internal).send()?.status().as_u16();
    ensure!(refused == 401, "a forwarded read without the secret: {refused}");
    let wrong = http()
        .get(&internal)
        .header("x-projector-cluster-secret", "nope")
        .send()?;
    ensure!(
        wrong.status().as_u16() == 401,
        "with a wrong secret: {}",
        wrong.status()
    );

    let mut producer = produce_command(&broker, &registry, &events, 60).spawn()?;
    let keys: Vec<(String, String)> = summary_oracle
        .keys()
        .step_by(25)
        .map(|k| ("order_summary".to_owned(), k.clone()))
        .chain(
            stats_oracle
                .keys()
                .take(12)
                .map(|k| ("customer_stats".to_owned(), k.clone())),
        )
        .collect();
    let urls = Arc::new(Mutex::new(vec![w1.url(), w2.url(), w3.url()]));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let reader = {
        let (urls, stop, seen, keys) = (urls.clone(), stop.clone(), seen.clone(), keys.clone());
        std::thread::spawn(move || poll(urls, keys, stop, seen))
    };

    // Readers see values once the first events are folded.
    wait_until("a first answer", Duration::from_secs(60), || {
        seen.lock().unwrap().statuses.contains_key(&200)
    })?;
    std::thread::sleep(Duration::from_secs(3));
    w2.service.kill();
    std::thread::sleep(Duration::from_secs(2));
    w2.restart(&home2)?;
    let (mut w4, _) = start(dir.path(), &broker, &registry, "w4")?;
    urls.lock().unwrap().push(w4.url());
    wait_until("w4 to serve partitions", Duration::from_secs(90), || {
        live_claims(&w1)
            .get("w4")
            .is_some_and(|c| c.values().any(|served| !served.is_empty()))
    })
    .with_context(|| format!("claims seen by w1: {:?}", live_claims(&w1)))?;
    w4.service.signal("TERM")?;
    let status = w4.service.wait_exit(Duration::from_secs(60))?;
    ensure!(status.success(), "w4 stops cleanly on SIGTERM: {status}");
    urls.lock().unwrap().retain(|u| *u != w4.url());

    let produced = producer.wait()?;
    ensure!(produced.success(), "the producer: {produced}");
    let workers = [&w1, &w2, &w3];
    let oracles = [
        ("order_summary", &summary_oracle),
        ("customer_stats", &stats_oracle),
        ("revenue_by_day", &revenue_oracle),
        ("order_lines", &lines_oracle),
    ];
    all_match(
        &workers,
        &oracles,
        "every worker to answer every key as the oracle",
    )?;
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reader thread");
    seen.lock()
        .unwrap()
        .check("while workers came and went", keys.len())?;

    // w4 left with a tombstone: every worker sees the three, serving everything.
    wait_until(
        "every worker to see w1, w2 and w3 only",
        Duration::from_secs(30),
        || workers.iter().all(|w| sees_settled(w, &["w1", "w2", "w3"])),
    )
    .with_context(|| format!("claims seen by w3: {:?}", live_claims(&w3)))?;

    // Caught up: nothing restoring, no lag, in the view and the metrics.
    wait_until(
        "no lag and nothing restoring anywhere",
        Duration::from_secs(30),
        || {
            workers.iter().all(|w| {
                let lag_free = w.get("/projections").is_ok_and(|(_, list)| {
                    list["cluster"]["workers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .all(|worker| {
                            worker["projections"]
                                .as_object()
                                .into_iter()
                                .flatten()
                                .all(|(_, c)| {
                                    c["partitions"]
                                        .as_array()
                                        .into_iter()
                                        .flatten()
                                        .all(|p| p["lag_events"] == 0)
                                })
                        })
                });
                let metrics = w.metrics().unwrap_or_default();
                lag_free
                    && ["order_summary", "customer_stats"].iter().all(|name| {
                        projector_tests::metric_value(
                            &metrics,
                            "projector_restoring_partitions",
                            &[("projection", name)],
                        ) == Some(0.0)
                            && projector_tests::metric_value(
                                &metrics,
                                "projector_restore_remaining_events",
                                &[("projection", name)],
                            ) == Some(0.0)
                    })
            })
        },
    )?;

    // Read-your-writes: an offset folded answers at once; one not yet written
    // waits and gets 503 naming the partition.
    let key = summary_oracle.keys().next().expect("orders");
    let (status, value) = w3.get(&format!("/projections/order_summary/state/{key}"))?;
    ensure!(status == 200, "{status} {value}");
    let (partition, next) = value["as_of"]
        .as_object()
        .and_then(|o| o.iter().next())
        .map(|(p, n)| (p.clone(), n.as_i64().unwrap_or(0)))
        .context("as_of names the key's partition")?;
    ensure!(
        value["as_of"].as_object().map(|o| o.len()) == Some(1),
        "a keyed read needs only the key's partition: {value}"
    );
    let (status, _) = w1.get(&format!(
        "/projections/order_summary/state/{key}?min_as_of={partition}:{}",
        next - 1
    ))?;
    ensure!(status == 200, "min_as_of of a folded offset: {status}");
    let (status, body) = w2.get(&format!(
        "/projections/order_summary/state/{key}?min_as_of={partition}:{}",
        next + 1_000
    ))?;
    ensure!(
        status == 503 && body.to_string().contains(&partition),
        "min_as_of past the log: {status} {body}"
    );

    // Scans merge every worker's partitions in key order, page by page.
    ensure!(
        scan_all(&w2, "customer_stats", "", 7)? == stats_oracle,
        "customer_stats scanned on w2 equals the oracle"
    );
    let prefix = "order-19-0001";
    let want: BTreeMap<String, Value> = summary_oracle
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ensure!(want.len() == 100, "the prefix picks 100 orders");
    ensure!(
        scan_all(&w1, "order_summary", prefix, 30)? == want,
        "order_summary scanned on w1 equals the oracle"
    );

    // `projector status` on any worker shows every worker and its partitions.
    let output = std::process::Command::new(projector_bin())
        .args(["status", "--config"])
        .arg(home3.join("projector.toml"))
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "projector status: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for id in ["w1", "w2", "w3"] {
        ensure!(
            text.lines().any(|l| l.starts_with(id) && l.contains("orders/")),
            "status lists {id} with its partitions:\n{text}"
        );
    }

    let workers = Workers {
        w1: &mut w1,
        w2: &w2,
        w3: &w3,
    };
    replay_across_workers(&broker, &registry, dir.path(), late, workers, &home1, &keys)?;
    let summary_oracle = orders::oracle(&stream.lines);
    let stats_oracle = read_models::customer_stats(&stream.lines);
    let revenue_oracle = read_models::revenue_by_day(&stream.lines);
    let lines_oracle = read_models::order_lines(&stream.lines);
    let workers = [&w1, &w2, &w3];
    let oracles = [
        ("order_summary", &summary_oracle),
        ("customer_stats", &stats_oracle),
        ("revenue_by_day", &revenue_oracle),
        ("order_lines", &lines_oracle),
    ];
    all_match(
        &workers,
        &oracles,
        "every worker to answer every key as the oracle of the whole stream",
    )?;
    abort_from_another_worker([&w1, &w2, &w3], &summary_oracle)?;

    // w1 restarts after the switch: generation 2 reads in the group every
    // worker folded it in, so each partition has exactly one owner again.
    w1.service.signal("TERM")?;
    w1.service.wait_exit(Duration::from_secs(60))?;
    w1.restart(&home1)?;
    let owners = |w: &Worker| -> BTreeMap<String, usize> {
        let mut owners = BTreeMap::new();
        for claims in live_claims(w).values() {
            for partition in claims.get("order_summary").into_iter().flatten() {
                *owners.entry(partition.clone()).or_default() += 1;
            }
        }
        owners
    };
    wait_until(
        "each partition of order_summary served by exactly one worker",
        Duration::from_secs(90),
        || {
            let owners = owners(&w2);
            live_claims(&w2).len() == 3 && owners.len() == 8 && owners.values().all(|n| *n == 1)
        },
    )
    .with_context(|| format!("owners seen by w2: {:?}", owners(&w2)))?;
    for w in [&w1, &w2, &w3] {
        assert_matches(w, "order_summary", &summary_oracle)?;
    }
    Ok(())
}

/// A replay requested on w2 and aborted from w3: every worker drops its share,
/// and generation 2 goes on serving.
fn abort_from_another_worker(workers: [&Worker; 3], oracle: &BTreeMap<String, Value>) -> Result<()> {
    let [_, w2, w3] = workers;
    let (status, body) = w2.post("/projections/order_summary/replay", Some(TOKEN))?;
    ensure!(
        status == 202 && body["replay"]["generation"] == 3,
        "a second replay: {status} {body}"
    );
    let replay_claims = |w: &Worker| -> Vec<Value> {
        w.get("/projections")
            .map(|(_, list)| {
                list["cluster"]["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|worker| worker["projections"]["order_summary"]["replay"].clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until(
        "every worker to fold its share of generation 3",
        Duration::from_secs(60),
        || {
            workers.iter().all(|w| {
                let claims = replay_claims(w);
                claims.len() == 3 && claims.iter().all(|c| c["generation"] == 3)
            })
        },
    )?;
    let (status, body) = w3.delete("/projections/order_summary/replay", TOKEN)?;
    ensure!(
        status == 202 && body["aborting"] == 3,
        "abort on w3: {status} {body}"
    );
    wait_until(
        "every worker to drop generation 3",
        Duration::from_secs(60),
        || {
            workers.iter().all(|w| {
                let described = w.get("/projections/order_summary").is_ok_and(|(_, p)| {
                    p["generation"] == 2
                        && p["replay"].is_null()
                        && p["last_replay"]["generation"] == 3
                        && p["last_replay"]["outcome"] == "aborted"
                });
                let claims = replay_claims(w);
                described && claims.len() == 3 && claims.iter().all(Value::is_null)
            })
        },
    )?;
    for w in workers {
        assert_matches(w, "order_summary", oracle)?;
    }
    Ok(())
}

/// Waits until every key of each projection read from every worker equals its
/// oracle.
fn all_match(workers: &[&Worker], oracles: &[(&str, &BTreeMap<String, Value>)], what: &str) -> Result<()> {
    let mut last = Ok(());
    wait_until(what, Duration::from_secs(180), || {
        last = workers.iter().try_for_each(|w| {
            oracles
                .iter()
                .try_for_each(|(name, oracle)| assert_matches(w, name, oracle))
        });
        last.is_ok()
    })
    .with_context(|| format!("{last:?}"))
}

/// A worker log's lines about replays, for a failure's message.
fn replay_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("replay") || l.contains("cluster"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The three workers; w1 is killed and restarted.
struct Workers<'a> {
    w1: &'a mut Worker,
    w2: &'a Worker,
    w3: &'a Worker,
}

/// A replay of `order_summary` requested on w1 with `projector replay --wait`
/// while `tail` is produced; a second request on w2 gets 409; w1 (which
/// received it and coordinates it) is SIGKILLed mid-replay and restarted. A reader polls every worker throughout: no key
/// once answered 404s or goes back. Every worker ends on generation 2.
fn replay_across_workers(
    broker: &Broker,
    registry: &Registry,
    dir: &Path,
    tail: &[Value],
    Workers { w1, w2, w3 }: Workers<'_>,
    home1: &Path,
    keys: &[(String, String)],
) -> Result<()> {
    // Besides the keys polled before, orders written during the replay: their
    // values change while generations hand over.
    let keys: Vec<(String, String)> = keys
        .iter()
        .cloned()
        .chain(
            orders::oracle(tail)
                .keys()
                .step_by(8)
                .map(|k| ("order_summary".to_owned(), k.clone())),
        )
        .collect();
    let keys = &keys;
    let tail = write_events(dir, "tail.jsonl", tail)?;
    let mut producer = produce_command(broker, registry, &tail, 60).spawn()?;
    let urls = Arc::new(Mutex::new(vec![w1.url(), w2.url(), w3.url()]));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let reader = {
        let (urls, stop, seen, keys) = (urls.clone(), stop.clone(), seen.clone(), keys.to_vec());
        std::thread::spawn(move || poll(urls, keys, stop, seen))
    };
    let replay = std::process::Command::new(projector_bin())
        .args(["replay", "order_summary", "--wait", "--config"])
        .arg(home1.join("projector.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    wait_until("every worker to see the replay", Duration::from_secs(30), || {
        [&*w1, w2, w3].iter().all(|w| {
            w.get("/projections/order_summary")
                .is_ok_and(|(_, p)| p["replay"]["generation"] == 2)
        })
    })?;
    // One replay for the deployment: a request on another worker is refused.
    let (status, body) = w2.post("/projections/order_summary/replay", Some(TOKEN))?;
    ensure!(
        status == 409 && body["replay"]["generation"] == 2 && body["replay"]["requested_on"] == "w1",
        "a second replay request on w2: {status} {body}"
    );
    let (_, described) = w1.get("/projections/order_summary")?;
    ensure!(
        described["replay"]["phase"] == "replaying",
        "still replaying when w1 is killed: {described}\nw1's log:\n{}",
        replay_lines(&w1.service.log())
    );
    // w1 received the request, coordinates the replay (the lowest id) and is
    // the worker `projector replay` polls.
    w1.service.kill();
    std::thread::sleep(Duration::from_secs(2));
    w1.restart(home1)?;
    let output = replay.wait_with_output()?;
    ensure!(
        output.status.success(),
        "projector replay --wait: {}{}\nw1's log:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        replay_lines(&w1.service.log())
    );
    let produced = producer.wait()?;
    ensure!(produced.success(), "the producer: {produced}");
    let workers = [&*w1, w2, w3];
    wait_until(
        "every worker to switch to generation 2",
        Duration::from_secs(60),
        || {
            workers.iter().all(|w| {
                w.get("/projections/order_summary").is_ok_and(|(_, p)| {
                    p["generation"] == 2 && p["last_replay"]["outcome"] == "switched" && p["replay"].is_null()
                })
            })
        },
    )?;
    // A while longer, so the reader also polls the new generation once settled.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reader thread");
    let checked = seen.lock().unwrap().check("during the replay", keys.len());
    checked
}
