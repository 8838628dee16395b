//! Unit tests of this module.

use super::*;
use std::io::Write;

const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
[registry]
url = "http://127.0.0.1:8081"
[store]
path = "data"
[[projections]]
name = "order_summary"
kind = "order_summary"
topics = ["orders"]
"#;

fn write(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn no_env() -> Env {
    Env::prefixed("PROJECTOR_TEST_UNSET_PREFIX__").split("__")
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let file = write(MINIMAL);
    let config = Config::load_with_env(file.path(), no_env()).unwrap();
    assert_eq!(config.kafka.group_prefix, "projector");
    assert_eq!(config.http.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.store.batch_max_events, 5_000);
    assert_eq!(config.projections[0].topics, vec!["orders".to_owned()]);
}

#[test]
fn unknown_key_is_refused_with_its_name_and_the_file() {
    let file = write(&MINIMAL.replace("[store]", "[store]\ncolour = \"red\""));
    let error = Config::load_with_env(file.path(), no_env())
        .unwrap_err()
        .to_string();
    assert!(error.contains("colour"), "{error}");
    assert!(error.contains(&file.path().display().to_string()), "{error}");
}

#[test]
fn invalid_value_names_the_key() {
    let file = write(&MINIMAL.replace("[store]", "[store]\nbatch_max_events = \"many\""));
    let error = Config::load_with_env(file.path(), no_env())
        .unwrap_err()
        .to_string();
    assert!(error.contains("store.batch_max_events"), "{error}");
}

#[test]
fn duplicate_projection_names_are_refused() {
    let twice =
        format!("{MINIMAL}\n[[projections]]\nname = \"order_summary\"\nkind = \"x\"\ntopics = [\"t\"]\n");
    let file = write(&twice);
    let error = Config::load_with_env(file.path(), no_env())
        .unwrap_err()
        .to_string();
    assert!(error.contains("projections[1].name"), "{error}");
}

#[test]
fn dead_letter_policy_needs_a_topic() {
    let file = write(&format!("{MINIMAL}on_poison = \"dead_letter\"\n"));
    let error = Config::load_with_env(file.path(), no_env())
        .unwrap_err()
        .to_string();
    assert!(error.contains("projections[0].dead_letter_topic"), "{error}");
    let file = write(&format!("{MINIMAL}on_poison = \"explode\"\n"));
    let error = Config::load_with_env(file.path(), no_env())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("projections.0.on_poison") || error.contains("on_poison"),
        "{error}"
    );
}

#[test]
fn environment_overrides_the_file() {
    let file = write(MINIMAL);
    let env = Env::prefixed("PROJECTOR_CFGTEST__").split("__");
    // Only this test uses the prefix, so setting it cannot disturb other tests.
    std::env::set_var("PROJECTOR_CFGTEST__KAFKA__BROKERS", "127.0.0.1:19092");
    let config = Config::load_with_env(file.path(), env).unwrap();
    assert_eq!(config.kafka.brokers, "127.0.0.1:19092");
}

#[test]
fn a_cluster_table_is_checked_and_defaults_to_the_group_prefix() {
    let cluster = |table: &str| format!("{MINIMAL}\n[cluster]\n{table}");
    let file = write(&cluster(
        "advertised_url = \"http://10.0.0.5:8080\"\nsecret = \"0123456789abcdef\"\nworker_id = \"w1\"",
    ));
    let config = Config::load_with_env(file.path(), no_env()).unwrap();
    let loaded = config.cluster.unwrap();
    assert_eq!(loaded.topic("projector"), "projector.cluster");
    assert_eq!(loaded.worker_id(8080), "w1");
    assert!(!loaded.static_membership);
    assert_eq!(
        config.kafka.partitioner,
        Partitioner::Any,
        "unknown unless configured"
    );
    assert!(
        !format!("{loaded:?}").contains("0123456789abcdef"),
        "the secret is redacted"
    );
    for (table, key) in [
        (
            "advertised_url = \"http://a:1\"\nsecret = \"short\"",
            "cluster.secret",
        ),
        (
            "advertised_url = \"a:1\"\nsecret = \"0123456789abcdef\"",
            "cluster.advertised_url",
        ),
        (
            "advertised_url = \"http://a:1\"\nsecret = \"0123456789abcdef\"\nforward_timeout_ms = 0",
            "cluster.forward_timeout_ms",
        ),
        ("advertised_url = \"http://a:1\"", "secret"),
    ] {
        let file = write(&cluster(table));
        let error = Config::load_with_env(file.path(), no_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains(key), "{table}: {error}");
        assert!(
            error.contains(&file.path().display().to_string()),
            "names the file: {error}"
        );
    }
    let file = write(&MINIMAL.replace("[registry]", "partitioner = \"crc16\"\n[registry]"));
    let error = Config::load_with_env(file.path(), no_env())
        .unwrap_err()
        .to_string();
    assert!(error.contains("kafka.partitioner"), "{error}");
}
