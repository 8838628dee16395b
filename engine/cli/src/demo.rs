//! `projector demo`: everything in one process, no infrastructure. An in-process
//! Kafka-protocol broker (librdkafka's mock cluster), the development schema
//! registry, a producer writing a realistic stream of the demo domain (including old
//! event versions that get upcast), and a worker running `config/demo.toml`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use apache_avro::types::Value;
use apache_avro::Schema;
use engine::config::Config;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

/// Events per second the demo producer keeps writing after its initial backlog.
const STEADY_RATE: u64 = 500;
/// Orders written at once before the steady stream starts.
const BACKLOG_ORDERS: u64 = 2_000;

/// Runs the demo until Ctrl-C.
pub async fn run(config_path: &Path, listen: SocketAddr, builtins: engine::worker::Builtins) -> Result<()> {
    let cluster = MockCluster::new(1).context("starting the in-process Kafka cluster")?;
    for topic in ["orders", "accounts"] {
        cluster
            .create_topic(topic, 4, 1)
            .with_context(|| format!("creating topic {topic}"))?;
    }
    let brokers = cluster.bootstrap_servers();

    let registry_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let registry_url = format!("http://{}", registry_listener.local_addr()?);
    let subjects = registry::open(None).map_err(anyhow::Error::msg)?;
    tokio::spawn(async move { axum::serve(registry_listener, registry::router(subjects)).await });

    let mut config = Config::load(config_path)?;
    config.kafka.brokers = brokers.clone();
    config.registry.url = registry_url.clone();
    config.http.listen = listen;
    let data = tempdir()?;
    config.store.path = data.clone();

    let schemas_dir = config.schemas.dir.clone();
    let ids = register_schemas(&registry_url, &schemas_dir).await?;
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .context("creating the demo producer")?;
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, produced) = (stop.clone(), produced.clone());
        std::thread::spawn(move || write_stream(&producer, &ids, &stop, &produced))
    };

    print_intro(
        listen,
        &brokers,
        &registry_url,
        &data,
        config_path,
        config.http.admin_token.as_deref(),
    );
    let names: Vec<String> = config.projections.iter().map(|p| p.name.clone()).collect();
    let summary_stop = stop.clone();
    let summary = tokio::spawn(async move { show_summary(&names, &produced, &summary_stop).await });
    let outcome = engine::worker::run(config, config_path, &builtins).await;
    stop.store(true, Ordering::Relaxed);
    let _ = summary.await;
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    let _ = std::fs::remove_dir_all(&data);
    drop(cluster);
    outcome.map_err(Into::into)
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("projector-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Schema (id, parsed) of each (type, version) the producer writes.
type SchemaIds = HashMap<(String, u32), (u32, Schema)>;

const WRITTEN: [(&str, &str, u32); 9] = [
    ("orders", "shop.orders/OrderPlaced", 1),
    ("orders", "shop.orders/OrderPlaced", 3),
    ("orders", "shop.orders/PaymentCharged", 1),
    ("orders", "shop.orders/OrderShipped", 1),
    ("orders", "shop.orders/OrderShipped", 2),
    ("orders", "shop.orders/OrderDelivered", 1),
    ("orders", "shop.orders/OrderCancelled", 1),
    ("accounts", "bank.accounts/AccountOpened", 1),
    ("accounts", "bank.accounts/MoneyDeposited", 1),
];

/// Registers the schemas the producer writes, oldest first (TopicRecordNameStrategy
/// subjects, as Confluent's serializers name them).
async fn register_schemas(registry_url: &str, dir: &Path) -> Result<SchemaIds> {
    let settings = SrSettings::new(registry_url.to_owned());
    let mut ids = SchemaIds::new();
    let mut written: Vec<(&str, &str, u32)> = WRITTEN.to_vec();
    written.push(("accounts", "bank.accounts/MoneyWithdrawn", 1));
    for (topic, path, version) in written {
        let file = dir.join(format!("{path}.v{version}.avsc"));
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let schema = Schema::parse_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        let name = path.replace('/', ".");
        let supplied = SuppliedSchema::new(Some(name.clone()), SchemaType::Avro, text);
        let registered = post_schema(&settings, format!("{topic}-{name}"), supplied)
            .await
            .map_err(|e| anyhow::anyhow!("registering {name} v{version}: {e}"))?;
        let short = path.rsplit('/').next().unwrap_or_default().to_owned();
        ids.insert((short, version), (registered.id, schema));
    }
    Ok(ids)
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn text(value: impl Into<String>) -> Value {
    Value::String(value.into())
}

/// A small deterministic generator (xorshift), so the stream is the same each run.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The events of order `n`: placed (v1 for one order in five, upcast to v3 by the
/// worker), charged, shipped (v1 or v2), then delivered or cancelled.
fn order_events(n: u64, dice: &mut Dice) -> Vec<(&'static str, u32, Value)> {
    let id = format!("order-{n:06}");
    let at = 1_700_000_000_000 + n as i64 * 60_000;
    let qty = 1 + dice.below(3) as i32;
    let price = 500 + dice.below(9_500) as i64;
    let items = Value::Array(vec![record(vec![
        ("sku", text(format!("sku-{}", dice.below(40)))),
        ("qty", Value::Int(qty)),
        ("priceCents", Value::Long(price)),
    ])]);
    let total = qty as i64 * price;
    let customer = text(format!("customer-{:03}", dice.below(200)));
    let placed = if n % 5 == 0 {
        (
            "OrderPlaced",
            1,
            record(vec![
                ("orderId", text(&id)),
                ("customerId", customer),
                ("items", items),
                ("total", Value::Double(total as f64 / 100.0)),
                ("placedAt", Value::TimestampMillis(at)),
            ]),
        )
    } else {
        (
            "OrderPlaced",
            3,
            record(vec![
                ("orderId", text(&id)),
                ("customerId", customer),
                ("items", items),
                ("itemCount", Value::Int(1)),
                ("totalCents", Value::Long(total)),
                ("currency", text("EUR")),
                ("placedAt", Value::TimestampMillis(at)),
            ]),
        )
    };
    let mut events = vec![
        placed,
        (
            "PaymentCharged",
            1,
            record(vec![
                ("orderId", text(&id)),
                ("amountCents", Value::Long(total)),
                ("card", text("visa")),
            ]),
        ),
    ];
    if dice.below(10) < 8 {
        let tracking = text(format!("DHL-{n}"));
        events.push(if n % 2 == 0 {
            (
                "OrderShipped",
                1,
                record(vec![
                    ("orderId", text(&id)),
                    ("trackingId", tracking),
                    ("shippedAt", Value::TimestampMillis(at + 3_600_000)),
                ]),
            )
        } else {
            (
                "OrderShipped",
                2,
                record(vec![
                    ("orderId", text(&id)),
                    ("trackingId", tracking),
                    ("carrier", text("DHL")),
                    ("shippedAt", Value::TimestampMillis(at + 3_600_000)),
                ]),
            )
        });
        events.push((
            "OrderDelivered",
            1,
            record(vec![
                ("orderId", text(&id)),
                ("deliveredAt", Value::TimestampMillis(at + 86_400_000)),
            ]),
        ));
    } else {
        events.push((
            "OrderCancelled",
            1,
            record(vec![
                ("orderId", text(&id)),
                ("reason", text("changed mind")),
                ("cancelledAt", Value::TimestampMillis(at + 600_000)),
            ]),
        ));
    }
    events
}

/// Event `n` of the accounts stream and its key: 100 accounts opened, then
/// deposits and withdrawals among them.
fn account_event(n: u64, dice: &mut Dice) -> (String, (&'static str, u32, Value)) {
    if n < 100 {
        let id = format!("account-{n:03}");
        let opened = record(vec![
            ("accountId", text(&id)),
            ("owner", text(format!("owner-{n}"))),
            ("openedAt", Value::TimestampMillis(n as i64)),
        ]);
        return (id, ("AccountOpened", 1, opened));
    }
    let id = format!("account-{:03}", dice.below(100));
    let amount = Value::Long(100 + dice.below(20_000) as i64);
    let kind = if dice.below(3) == 0 {
        "MoneyWithdrawn"
    } else {
        "MoneyDeposited"
    };
    let movement = record(vec![
        ("accountId", text(&id)),
        ("amountCents", amount),
        ("at", Value::TimestampMillis(n as i64)),
    ]);
    (id, (kind, 1, movement))
}

fn send(
    producer: &BaseProducer,
    ids: &SchemaIds,
    topic: &str,
    key: &str,
    event: (&'static str, u32, Value),
) -> bool {
    let (name, version, value) = event;
    let Some((id, schema)) = ids.get(&(name.to_owned(), version)) else {
        return false;
    };
    let Ok(body) = apache_avro::to_avro_datum(schema, value) else {
        return false;
    };
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&id.to_be_bytes());
    framed.extend_from_slice(&body);
    loop {
        match producer.send(BaseRecord::to(topic).key(key).payload(&framed)) {
            Ok(()) => return true,
            Err((_, _)) => {
                producer.poll(Duration::from_millis(10));
            }
        }
    }
}

fn write_stream(producer: &BaseProducer, ids: &SchemaIds, stop: &AtomicBool, produced: &AtomicU64) {
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15);
    let started = Instant::now();
    let (mut order, mut account) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let key = format!("order-{order:06}");
        let mut count = 0;
        for event in order_events(order, &mut dice) {
            count += u64::from(send(producer, ids, "orders", &key, event));
        }
        for _ in 0..2 {
            let (key, event) = account_event(account, &mut dice);
            count += u64::from(send(producer, ids, "accounts", &key, event));
            account += 1;
        }
        order += 1;
        let total = produced.fetch_add(count, Ordering::Relaxed) + count;
        producer.poll(Duration::ZERO);
        if order > BACKLOG_ORDERS {
            let due = Duration::from_secs_f64(total as f64 / STEADY_RATE as f64);
            let backlog_time = Duration::from_secs_f64((BACKLOG_ORDERS * 6) as f64 / STEADY_RATE as f64);
            if let Some(wait) = (due.saturating_sub(backlog_time)).checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(200)));
            }
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
}

fn print_intro(
    listen: SocketAddr,
    brokers: &str,
    registry: &str,
    data: &Path,
    config_path: &Path,
    admin_token: Option<&str>,
) {
    let api = format!("http://{listen}");
    let projector = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "projector".into());
    let config = config_path.display();
    println!("Projector demo: an in-process Kafka cluster ({brokers}), the schema registry ({registry}),");
    println!("a producer writing orders and accounts (old OrderPlaced v1 events included, upcast to v3),");
    println!(
        "and a worker running config/demo.toml (state in {}).",
        data.display()
    );
    println!();
    println!("Try:");
    println!("  curl -s {api}/projections");
    println!("  curl -s {api}/projections/order_summary/state/order-000042");
    println!("  curl -s '{api}/projections/revenue_by_day/state?limit=5'");
    println!("  curl -s {api}/projections/customer_stats/state/customer-007");
    println!("  curl -s {api}/projections/account_balance/state/account-001");
    println!("  curl -s {api}/metrics | grep ^projector_consumer_lag");
    println!("  curl -s {api}/readyz");
    if let Some(token) = admin_token {
        println!(
            "  curl -s -X POST -H 'Authorization: Bearer {token}' {api}/projections/order_summary/replay"
        );
    }
    println!("  {projector} status --config {config} --url {api}");
    println!("  {projector} replay customer_orders --config {config} --url {api} --wait");
    println!("Ctrl-C stops it.");
    println!();
}

/// Every few seconds: events/s and lag per projection, from the worker's metrics.
async fn show_summary(names: &[String], produced: &AtomicU64, stop: &AtomicBool) {
    let interactive = std::io::stdout().is_terminal();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut last_at = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(if interactive { 1 } else { 5 }));
    ticker.tick().await;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let elapsed = last_at.elapsed().as_secs_f64().max(0.001);
        last_at = Instant::now();
        let mut lines = vec![format!(
            "{:<18} {:>12} {:>10} {:>10} {:>9}   (produced {})",
            "projection",
            "applied",
            "events/s",
            "lag",
            "lag s",
            produced.load(Ordering::Relaxed)
        )];
        for name in names {
            let applied = engine::metrics::EVENTS_APPLIED
                .with_label_values(&[name.as_str()])
                .get();
            let rate = (applied - last.get(name).copied().unwrap_or(0)) as f64 / elapsed;
            last.insert(name.clone(), applied);
            let (lag, lag_seconds) = engine::lag::summary(name);
            lines.push(format!(
                "{name:<18} {applied:>12} {rate:>10.0} {lag:>10} {lag_seconds:>9.1}"
            ));
        }
        if interactive {
            print!("\x1b[s\x1b[J{}\x1b[u", lines.join("\n"));
        } else {
            println!("{}", lines.join("\n"));
        }
    }
}
