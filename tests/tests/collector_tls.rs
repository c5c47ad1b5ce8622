//! Mutual TLS between agents, the collector and clients: an agent with a certificate from the
//! fleet's CA pushes to the collector; one without a certificate and a client without one are
//! refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use driftwatch_e2e::pki::TestCa;
use driftwatch_e2e::{driftwatch_bin, require_root, unique_suffix, wait_until, AgentUnderTest, Cgroup, CollectorUnderTest};

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(30);

const MODEL: &str = "\
version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: [\"0.0.0.0/0\"] } }
components: []
";

/// Runs a driftwatch client command and returns whether it succeeded, its stdout and its stderr.
fn run_client(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(driftwatch_bin().unwrap()).args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn collector_accepts_only_certified_agents_and_clients() {
    require_root().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = TestCa::new("driftwatch fleet CA").unwrap();
    let ca_pem = ca.write_cert(pki.path(), "ca.pem").unwrap();
    let server = ca.issue("collector", &["localhost", "127.0.0.1"]).unwrap().write(pki.path(), "collector").unwrap();
    let agent_id = ca.issue("agent tls-1", &["tls-1"]).unwrap().write(pki.path(), "agent").unwrap();
    let operator = ca.issue("operator", &["operator"]).unwrap().write(pki.path(), "operator").unwrap();

    let collector = CollectorUnderTest::start_with(&[
        "--tls-cert",
        path(&server.cert),
        "--tls-key",
        path(&server.key),
        "--tls-client-ca",
        path(&ca_pem),
    ])
    .unwrap();
    let api = collector.addr().to_string();

    let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(model.path(), MODEL).unwrap();
    let cgroup = Cgroup::create(&format!("dw-collector-tls-{}", unique_suffix())).unwrap();
    let bin = driftwatch_bin().unwrap();
    let certified = AgentUnderTest::start_with(
        &bin,
        model.path(),
        cgroup.path(),
        &[
            "--collector",
            &api,
            "--node",
            "tls-1",
            "--collector-tls-ca",
            path(&ca_pem),
            "--collector-tls-cert",
            path(&agent_id.cert),
            "--collector-tls-key",
            path(&agent_id.key),
        ],
    )
    .unwrap();

    // The certified agent shows up as a connected node to a certified client.
    let client_tls = ["--tls-ca", path(&ca_pem), "--tls-cert", path(&operator.cert), "--tls-key", path(&operator.key)];
    let status = wait_until(OBSERVE_TIMEOUT, || {
        let mut args = vec!["status", "--api", api.as_str()];
        args.extend_from_slice(&client_tls);
        let (ok, stdout, _) = run_client(&args);
        (ok && stdout.lines().any(|line| line.trim_start().starts_with("tls-1") && line.contains(" connected"))).then_some(stdout)
    });
    assert!(
        status.is_some(),
        "the certified agent never connected over TLS\ncollector log:\n{}\nagent log:\n{}",
        collector.log(),
        certified.log()
    );

    // A client with no certificate, and one in plaintext, are refused. Under TLS 1.3 the
    // collector's alert can lose the race with the connection closing, so the client's message
    // varies; the collector's log below names the cause.
    let (ok, _, stderr) = run_client(&["status", "--api", &api, "--tls-ca", path(&ca_pem)]);
    assert!(!ok, "a client without a certificate reached the collector");
    assert!(stderr.contains("failed"), "{stderr}");
    let (ok, _, _) = run_client(&["status", "--api", &api]);
    assert!(!ok, "a plaintext client reached the collector");

    // An agent that trusts the collector but has no certificate of its own is refused too.
    let uncertified_cgroup = cgroup.child("uncertified").unwrap();
    let uncertified = AgentUnderTest::start_with(
        &bin,
        model.path(),
        uncertified_cgroup.path(),
        &["--collector", &api, "--node", "tls-2", "--collector-tls-ca", path(&ca_pem)],
    )
    .unwrap();
    let rejected = wait_until(OBSERVE_TIMEOUT, || {
        (collector.log().matches("the client presented no certificate").count() >= 2).then_some(())
    });
    assert!(rejected.is_some(), "the collector did not reject the uncertified agent:\n{}", collector.log());
    let mut args = vec!["status", "--api", api.as_str()];
    args.extend_from_slice(&client_tls);
    let (ok, stdout, stderr) = run_client(&args);
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("tls-2"), "an uncertified agent became a node:\n{stdout}");
    drop(uncertified);
    drop(certified);
}
