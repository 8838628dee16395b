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
