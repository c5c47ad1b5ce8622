//! What the collector's live view and `driftwatch watch` tell a user who points them at the wrong
//! thing: a live view request for a foreign Host, raw events or a future sequence asked of a
//! collector, a lost collector, an unreachable or missing server, a model file that is missing.
//!
//! They need `DRIFTWATCH_BIN` (set by `cargo xtask test`) but not root: a collector loads no
//! kernel programs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use driftwatch_e2e::{driftwatch_bin, wait_until, CollectorUnderTest};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Returns the field `field` of the first JSON log record whose message is `message`, waiting for
/// it, because the live view logs its address from its own task.
fn logged_field(collector: &CollectorUnderTest, message: &str, field: &str) -> String {
    let found = wait_until(TIMEOUT, || {
        collector
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|record| record["fields"]["message"] == message)
            .and_then(|record| record["fields"][field].as_str().map(String::from))
    });
    found.unwrap_or_else(|| panic!("no log record {message:?} with {field}:\n{}", collector.log()))
}

/// Sends `GET path` with the Host header `host` and returns the status line and the body.
fn get(addr: SocketAddr, host: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {response:?}"));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

fn watch(args: &[&str]) -> Output {
    Command::new(driftwatch_bin().unwrap())
        .arg("watch")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn live_view_rejects_foreign_host() {
    let collector =
        CollectorUnderTest::start_with(&["--web", "127.0.0.1:0", "--web-allow-host", "Dash.Example", "--log-format", "json"])
            .unwrap();
    let url = logged_field(&collector, "live view listening", "url");
    let addr: SocketAddr = url.trim_start_matches("http://").trim_end_matches('/').parse().unwrap();

    let (status, body) = get(addr, &format!("rebind.attacker.example:{}", addr.port()), "/api/graph");
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    assert_eq!(
        body,
        "the host \"rebind.attacker.example\" is not allowed: the live view serves IP addresses, localhost \
         and the names given with --web-allow-host, which keeps pages of other origins out\n"
    );

    for host in [addr.to_string(), format!("localhost:{}", addr.port()), format!("dash.example:{}", addr.port())] {
        let (status, body) = get(addr, &host, "/api/graph");
        assert_eq!(status, "HTTP/1.1 200 OK", "Host: {host}");
        let graph: Value = serde_json::from_str(&body).unwrap_or_else(|error| panic!("Host: {host}: {error}: {body}"));
        assert!(graph["nodes"].is_array(), "Host: {host}: {body}");
    }
}

#[test]
fn allowed_host_needs_web() {
    let output = Command::new(driftwatch_bin().unwrap())
        .args(["collector", "--web-allow-host", "dash.example"])
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("the following required arguments were not provided"), "{text}");
    assert!(text.lines().any(|line| line.trim_start().starts_with("--web")), "{text}");
}

#[test]
fn collector_without_model_file_says_unreadable() {
    let output = Command::new(driftwatch_bin().unwrap())
        .args(["collector", "--listen", "127.0.0.1:0", "--model", "/nonexistent/driftwatch-hL/missing.yaml"])
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert_eq!(
        text.lines().last(),
        Some("error: the model /nonexistent/driftwatch-hL/missing.yaml cannot be read; the collector did not start"),
        "{text}"
    );
    assert!(!text.contains("invalid"), "{text}");
}

#[test]
fn event_filter_without_events_is_rejected() {
    // No server listens there: the check runs before watch connects.
    let output = watch(&["--api", "127.0.0.1:1", "--allow", "event=tcp-connect"]);

    assert!(!output.status.success());
    assert_eq!(
        stderr(&output).trim_end(),
        "error: --allow event=tcp-connect concerns raw events, but watch receives none without --events; \
         add --events tcp-connect (or a group such as --events all)"
    );
}

#[test]
fn collector_refuses_raw_events() {
    let collector = CollectorUnderTest::start().unwrap();
    let api = collector.addr().to_string();

    let output = watch(&["--api", &api, "--events", "tcp"]);

    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("a collector does not carry raw events, only deviations; drop --events (leave events empty) or watch an agent"),
        "{text}"
    );
}

#[test]
fn future_sequence_names_the_newest() {
    let collector = CollectorUnderTest::start().unwrap();
    let api = collector.addr().to_string();

    let output = watch(&["--api", &api, "--from-sequence", "99999"]);

    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("replay start 99999 is ahead of the newest sequence, 0,"), "{text}");
    assert!(!text.contains("agent"), "{text}");
}

#[test]
fn lost_collector_is_called_server() {
    let mut collector = CollectorUnderTest::start_with(&["--metrics", "127.0.0.1:0", "--log-format", "json"]).unwrap();
    let api = collector.addr().to_string();
    let metrics: SocketAddr = logged_field(&collector, "metrics listening", "addr").parse().unwrap();
    let mut child = Command::new(driftwatch_bin().unwrap())
        .args(["watch", "--api", &api])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The collector counts the stream once it is open.
    let subscribed = wait_until(TIMEOUT, || {
        let (_, body) = get(metrics, &metrics.to_string(), "/metrics");
        body.lines().any(|line| line == "driftwatch_subscribers 1").then_some(())
    });
    if subscribed.is_none() {
        let _ = child.kill();
    }
    assert!(subscribed.is_some(), "watch never subscribed");

    collector.kill();
    let exited = wait_until(TIMEOUT, || child.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();

    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains(&format!("error: lost the connection to the server at {api}: ")), "{text}");
}

#[test]
fn unreachable_server_prints_each_cause_once() {
    for api in ["127.0.0.1:1", "unix:/nonexistent/driftwatch-hL.sock"] {
        let output = watch(&["--api", api]);

        assert!(!output.status.success(), "{api}");
        let text = stderr(&output);
        let causes: Vec<&str> = text.trim_end().split(": ").collect();
        let mut unique = causes.clone();
        unique.dedup();
        assert_eq!(causes, unique, "{api}: {text}");
        assert!(text.starts_with(&format!("error: failed to connect to the driftwatch API at {api} (is the agent or collector running?): ")), "{text}");
    }
}
