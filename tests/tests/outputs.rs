//! The agent's outputs besides the gRPC stream, on real kernel events: Prometheus metrics scraped
//! over HTTP, the JSON lines file, model reload counters, and mutual TLS on the real binary's API
//! with the real `watch` and `status` commands as clients.
//!
//! They need root and `DRIFTWATCH_BIN` (set by `cargo xtask test`), and run one at a time because
//! each loads the eBPF programs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use driftwatch_e2e::pki::TestCa;
use driftwatch_e2e::stream::category_name;
use driftwatch_e2e::{
    driftwatch_bin, require_root, spawn_in, unique_suffix, wait_until, AgentUnderTest, Cgroup,
    DeviationWatcher,
};
use serde_json::Value;

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);

/// `app` is everything in the test's cgroup and may run only the demo service, so every other
/// program it runs is an unexpected-executable.
const MODEL: &str = r#"version: 1
zones:
  - { id: lab, trust: 50 }
components:
  - id: app
    zone: lab
    match: { cgroup: ["{ROOT}"] }
    executables: ["**/driftwatch-demo-service"]
flows: []
"#;

static AGENT_TESTS: Mutex<()> = Mutex::new(());

struct Lab {
    agent: AgentUnderTest,
    cgroup: Cgroup,
    model: tempfile::NamedTempFile,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    fn start(extra_args: &[&str]) -> Lab {
        let serial = AGENT_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let cgroup = Cgroup::create(&format!("dw-hF-outputs-{}", unique_suffix())).unwrap();
        let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        fs::write(model.path(), MODEL.replace("{ROOT}", cgroup.relative_path())).unwrap();
        let agent = AgentUnderTest::start_with(&driftwatch_bin().unwrap(), model.path(), cgroup.path(), extra_args).unwrap();
        Lab {
            agent,
            cgroup,
            model,
            _serial: serial,
        }
    }

    /// Runs `program` in the test's cgroup and waits for it to exit successfully.
    fn run_in_cgroup(&self, program: &str) {
        let mut process = spawn_in(None, Some(&self.cgroup), Command::new(program)).unwrap();
        process.wait_success(OBSERVE_TIMEOUT).unwrap();
    }

    /// Returns the metrics address the agent logged; the agent must run with `--log-format json`.
    fn metrics_addr(&self) -> SocketAddr {
        let log = self.agent.log();
        let addr = log
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|record| record["fields"]["message"] == "metrics listening")
            .and_then(|record| record["fields"]["addr"].as_str().map(String::from))
            .unwrap_or_else(|| panic!("the agent did not log its metrics address:\n{log}"));
        addr.parse().unwrap()
    }

    /// Sends SIGHUP to the agent, which reloads the model.
    fn hang_up(&self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is the agent, our child.
        let result = unsafe { libc::kill(self.agent.pid() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(result, 0);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.cgroup.kill_remaining();
    }
}

/// Fetches `/metrics` with a plain HTTP/1.1 request and returns the samples by `name{labels}`.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples.get(name).unwrap_or_else(|| panic!("no sample {name} in the scrape: {samples:#?}"))
}

/// Sums every sample of `metric` whose labels contain `label`.
fn sum_matching(samples: &BTreeMap<String, f64>, metric: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|(name, _)| name.starts_with(&format!("{metric}{{")) && name.contains(label))
        .map(|(_, value)| value)
        .sum()
}

fn jsonl_records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("invalid JSON line {line:?}: {e}")))
        .collect()
}

#[test]
fn metrics_and_jsonl_follow_real_execs() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("deviations.jsonl");
    let lab = Lab::start(&["--log-format", "json", "--metrics", "127.0.0.1:0", "--jsonl", jsonl.to_str().unwrap()]);
    let metrics = lab.metrics_addr();

    let before = scrape(metrics);
    let execs_before = sample(&before, "driftwatch_events_total{kind=\"exec\"}");
    let exits_before = sample(&before, "driftwatch_events_total{kind=\"exit\"}");
    // The JSON lines writer is the only subscriber so far.
    assert_eq!(sample(&before, "driftwatch_subscribers"), 1.0);

    for _ in 0..3 {
        lab.run_in_cgroup("/bin/true");
    }

    // The pipeline publishes its counters once a second; wait until the three exits are in.
    let after = wait_until(OBSERVE_TIMEOUT, || {
        let samples = scrape(metrics);
        (sample(&samples, "driftwatch_events_total{kind=\"exit\"}") >= exits_before + 3.0).then_some(samples)
    })
    .unwrap_or_else(|| panic!("three exits never reached the metrics; agent log:\n{}", lab.agent.log()));
    assert_eq!(sample(&after, "driftwatch_events_total{kind=\"exec\"}"), execs_before + 3.0);
    assert_eq!(sample(&after, "driftwatch_events_total{kind=\"exit\"}"), exits_before + 3.0);
    assert_eq!(sample(&after, "driftwatch_channel_events_dropped_total"), 0.0);

    // Every unexpected-executable deviation counted in the metrics is one line in the file and
    // one message on a gRPC stream that replays from the start.
    let category = "category=\"unexpected-executable\"";
    let counted = sum_matching(&after, "driftwatch_deviations_total", category);
    assert!(counted >= 1.0, "no unexpected-executable counted; agent log:\n{}", lab.agent.log());
    let lines = wait_until(OBSERVE_TIMEOUT, || {
        let records = jsonl_records(&jsonl);
        (records.len() as f64 >= counted).then_some(records)
    })
    .unwrap();
    let in_file: Vec<&Value> = lines.iter().filter(|line| line["category"] == "unexpected-executable").collect();
    assert_eq!(in_file.len() as f64, counted);
    assert!(in_file.iter().all(|line| line["type"] == "deviation" && line["source"] == "app"));
    assert!(in_file[0]["process"]["exe"].as_str().unwrap().ends_with("/true"), "{}", in_file[0]);

    let watcher = DeviationWatcher::subscribe(lab.agent.api_addr()).unwrap();
    let streamed = wait_until(OBSERVE_TIMEOUT, || {
        let deviations = watcher.deviations();
        (deviations.len() >= lines.len()).then_some(deviations)
    })
    .unwrap();
    let on_stream = streamed
        .iter()
        .filter(|deviation| category_name(deviation.category) == "unexpected-executable")
        .count();
    assert_eq!(on_stream as f64, counted);
    let with_watcher = scrape(metrics);
    assert_eq!(sample(&with_watcher, "driftwatch_subscribers"), 2.0);
    sample(&with_watcher, "driftwatch_graph_nodes");
    sample(&with_watcher, "driftwatch_graph_edges");
}

#[test]
fn metrics_count_model_reloads_by_result() {
    let lab = Lab::start(&["--log-format", "json", "--metrics", "127.0.0.1:0"]);
    let metrics = lab.metrics_addr();
    let reloads = |result: &str| {
        scrape(metrics)
            .get(&format!("driftwatch_model_reloads_total{{result=\"{result}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };

    lab.hang_up();
    wait_until(OBSERVE_TIMEOUT, || (reloads("success") == 1.0).then_some(()))
        .unwrap_or_else(|| panic!("the reload was not counted; agent log:\n{}", lab.agent.log()));

    fs::write(lab.model.path(), "version: 1\ncomponents: [ { id: broken\n").unwrap();
    lab.hang_up();
    wait_until(OBSERVE_TIMEOUT, || (reloads("failure") == 1.0).then_some(()))
        .unwrap_or_else(|| panic!("the failed reload was not counted; agent log:\n{}", lab.agent.log()));
    assert_eq!(reloads("success"), 1.0);
}

/// Runs `driftwatch` with `args` and returns (success, stdout, stderr).
fn run_client(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(driftwatch_bin().unwrap())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn mutual_tls_rejects_uncertified_clients() {
    let pki = tempfile::tempdir().unwrap();
    let ca = TestCa::new("driftwatch e2e CA").unwrap();
    let ca_pem = ca.write_cert(pki.path(), "ca.pem").unwrap();
    let server = ca.issue("agent", &["localhost", "127.0.0.1"]).unwrap().write(pki.path(), "agent").unwrap();
    let client = ca.issue("operator", &["operator"]).unwrap().write(pki.path(), "operator").unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let lab = Lab::start(&[
        "--tls-cert",
        &path(&server.cert),
        "--tls-key",
        &path(&server.key),
        "--tls-client-ca",
        &path(&ca_pem),
    ]);
    let api = lab.agent.api_arg();

    let (ok, stdout, stderr) = run_client(&[
        "status",
        "--api",
        &api,
        "--tls-ca",
        &path(&ca_pem),
        "--tls-cert",
        &path(&client.cert),
        "--tls-key",
        &path(&client.key),
    ]);
    assert!(ok, "status with a good certificate failed: {stderr}");
    assert!(stdout.starts_with("driftwatch "), "{stdout}");

    // Under TLS 1.3 the agent's alert can lose the race with the connection closing, so the advice
    // is not always there; the agent's log below names the cause either way.
    let (ok, _, stderr) = run_client(&["status", "--api", &api, "--tls-ca", &path(&ca_pem)]);
    assert!(!ok, "a client without a certificate reached the TLS API");
    assert!(stderr.contains("failed"), "{stderr}");
    let (ok, _, _) = run_client(&["status", "--api", &api]);
    assert!(!ok, "a plaintext client reached the TLS API");

    let log = wait_until(OBSERVE_TIMEOUT, || {
        let log = lab.agent.log();
        (log.matches("rejected a TLS client").count() >= 2).then_some(log)
    })
    .unwrap_or_else(|| panic!("the agent did not log both rejections:\n{}", lab.agent.log()));
    assert!(log.contains("the client presented no certificate"), "{log}");
    assert!(log.contains("plaintext clients are not accepted here"), "{log}");

    // A deviation reaches `watch --format jsonl` over TLS.
    let mut watch = Command::new(driftwatch_bin().unwrap())
        .args(["watch", "--api", &api, "--replay", "--format", "jsonl"])
        .args(["--tls-ca", &path(&ca_pem), "--tls-cert", &path(&client.cert), "--tls-key", &path(&client.key)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lab.run_in_cgroup("/bin/true");
    // A reader thread, so that the wait has a deadline even when watch prints nothing.
    let stdout = watch.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let found = receiver.recv_timeout(OBSERVE_TIMEOUT).ok();
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
    unsafe { libc::kill(watch.id() as libc::pid_t, libc::SIGTERM) };
    let _ = watch.wait();
    let line = found.expect("watch printed no line");
    let record: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["type"], "deviation");
    assert_eq!(record["category"], "unexpected-executable");
}

#[test]
fn agent_refuses_plaintext_on_non_loopback_address() {
    let _serial = AGENT_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    require_root().unwrap();
    let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    fs::write(model.path(), MODEL.replace("{ROOT}", "/dw-hF-unused")).unwrap();
    let (ok, _, stderr) = run_client(&["agent", "--model", model.path().to_str().unwrap(), "--api", "0.0.0.0:0"]);
    assert!(!ok);
    assert!(stderr.contains("refusing to serve the API in plaintext on 0.0.0.0:0"), "{stderr}");
}
