//! `projector registry` against Confluent's own Python SchemaRegistryClient, and its
//! persistence across restarts.

use anyhow::{ensure, Result};
use projector_tests::{free_port, http, projector_bin, python, repo_root, Registry, Service};

#[test]
fn confluent_python_client_works_unmodified() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::start(dir.path())?;
    let output = std::process::Command::new(python())
        .arg(repo_root().join("tests/python/registry_check.py"))
        .arg(registry.url())
        .output()?;
    ensure!(
        output.status.success(),
        "{}{}\nregistry log:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        registry.service.log()
    );
    Ok(())
}

#[test]
fn data_directory_keeps_schemas_across_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("registry-data");
    let port = free_port();
    let start = || -> Result<Service> {
        let mut command = std::process::Command::new(projector_bin());
        command
            .args(["registry", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(&data);
        let mut service = Service::start("registry", command, &dir.path().join("registry.log"))?;
        projector_tests::wait_until("registry", std::time::Duration::from_secs(20), || {
            service.check_alive().is_ok() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(service)
    };
    let url = format!("http://127.0.0.1:{port}");
    let schema = r#"{"type":"record","name":"E","fields":[{"name":"a","type":"long"}]}"#;
    let mut first = start()?;
    let registered: serde_json::Value = http()
        .post(format!("{url}/subjects/s/versions"))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .body(serde_json::json!({ "schema": schema }).to_string())
        .send()?
        .json()?;
    let id = registered["id"].as_u64().expect("an id");
    first.kill();
    let _second = start()?;
    let fetched: serde_json::Value = http().get(format!("{url}/schemas/ids/{id}")).send()?.json()?;
    assert_eq!(fetched["schema"], schema);
    Ok(())
}
