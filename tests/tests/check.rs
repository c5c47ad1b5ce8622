//! End-to-end tests of `driftwatch check` on real kernel events: the real binary runs a command
//! in its own cgroup with the eBPF programs loaded, and the tests read its exit status, report and
//! recorded graph.
//!
//! The command is the demo service connecting to TCP listeners that the test binds on loopback.
//! The listeners live in the test process, outside the observed cgroup, so the check observes
//! only the connecting side. The tests need root and `DRIFTWATCH_BIN` (set by `cargo xtask
//! test`), and run one at a time because each loads the eBPF programs.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use driftwatch_e2e::{demo_service_bin, driftwatch_bin, require_root, spawn_in};
use serde_json::Value;

/// How long one check run may take, loading the eBPF programs included.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// `app` is the demo service in zone ci (trust 50); loopback addresses are the zone loopback
/// (trust 80). Only `app -> loopback` on `{DECLARED}` is declared. An undeclared connection from
/// app to loopback goes toward a more trusted zone (likelihood moderate) whose trust puts critical
/// impact at stake, so it is an unexpected-flow of severity high.
const MODEL: &str = r#"version: 1
zones:
  - { id: ci, trust: 50 }
  - { id: loopback, trust: 80, match: { cidrs: ["127.0.0.0/8"] } }
components:
  - id: app
    zone: ci
    match: { exe: ["**/driftwatch-demo-service"] }
flows:
  - { from: app, to: loopback, port: {DECLARED} }
"#;

static CHECK_TESTS: Mutex<()> = Mutex::new(());

/// A loopback listener that accepts and closes connections, counting them.
struct Listener {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

impl Listener {
    fn start() -> Listener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        // The thread ends with the test process; accept errors only skip one connection.
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stream.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Listener { addr, accepted }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// One test's setup: the model file with a declared and an undeclared listener.
struct Setup {
    declared: Listener,
    undeclared: Listener,
    model: tempfile::NamedTempFile,
    dir: tempfile::TempDir,
    demo: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

/// What one `driftwatch check` run produced.
struct CheckRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl CheckRun {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("driftwatch check was killed: {}\n{}", self.status, self.describe()))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| panic!("the report is not JSON ({error})\n{}", self.describe()))
    }

    fn describe(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

impl Setup {
    fn new() -> Setup {
        let serial = CHECK_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let declared = Listener::start();
        let undeclared = Listener::start();
        let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        fs::write(model.path(), MODEL.replace("{DECLARED}", &declared.addr.port().to_string())).unwrap();
        Setup { declared, undeclared, model, dir: tempfile::tempdir().unwrap(), demo: demo_service_bin().unwrap(), _serial: serial }
    }

    fn connect_once(&self, target: SocketAddr) -> Vec<String> {
        vec![self.demo.display().to_string(), "connect-once".into(), "--target".into(), target.to_string()]
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `driftwatch check --model <model> <options> -- <command>` and waits for it.
    fn check(&self, options: &[&str], command: &[String]) -> CheckRun {
        let mut check = Command::new(driftwatch_bin().unwrap());
        check.arg("check").arg("--model").arg(self.model.path()).args(options).arg("--").args(command);
        let mut process = spawn_in(None, None, check).unwrap();
        let status = process.wait_exit(CHECK_TIMEOUT).unwrap();
        CheckRun { status, stdout: process.stdout_lines().join("\n"), stderr: process.stderr() }
    }
}

fn deviation_ids(report: &Value) -> Vec<String> {
    report["deviations"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
}

fn read_graph(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Edges of a recorded graph to `port`, as (source, destination, declared).
fn edges_to_port(graph: &Value, port: u16) -> Vec<(String, String, bool)> {
    graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|edge| edge["port"] == port)
        .map(|edge| {
            (
                edge["source"].as_str().unwrap().to_string(),
                edge["destination"].as_str().unwrap().to_string(),
                edge["declared"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn clean_command_exits_zero_with_empty_report() {
    let setup = Setup::new();
    let graph_path = setup.path("graph.json");
    let run = setup.check(&["--format", "json", "--record", graph_path.to_str().unwrap()], &setup.connect_once(setup.declared.addr));

    assert_eq!(run.code(), 0, "{}", run.describe());
    let report = run.json();
    assert_eq!(deviation_ids(&report), Vec::<String>::new(), "{}", run.describe());
    assert_eq!(report["verdict"], "pass");
    // The empty report comes from an observed run: the declared connection is in the graph.
    let edges = edges_to_port(&read_graph(&graph_path), setup.declared.addr.port());
    assert_eq!(edges, [("app".to_string(), "loopback".to_string(), true)]);
}

#[test]
fn clean_command_text_report_ends_with_summary() {
    let setup = Setup::new();
    let run = setup.check(&[], &setup.connect_once(setup.declared.addr));

    assert_eq!(run.code(), 0, "{}", run.describe());
    let last = run.stdout.lines().last().unwrap_or_default();
    assert_eq!(last, "driftwatch check: no deviations — passing at --fail-on high", "{}", run.describe());
    assert!(!run.stdout.contains('\x1b'), "no colour outside a terminal:\n{}", run.stdout);
}

#[test]
fn undeclared_connection_fails_with_high_finding() {
    let setup = Setup::new();
    let port = setup.undeclared.addr.port();
    let run = setup.check(&["--format", "json"], &setup.connect_once(setup.undeclared.addr));

    assert_eq!(run.code(), 1, "{}", run.describe());
    let report = run.json();
    let id = format!("unexpected-flow@app@loopback@tcp/{port}");
    let finding = report["deviations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id.as_str())
        .unwrap_or_else(|| panic!("no {id} in {:?}", deviation_ids(&report)));
    assert_eq!(finding["severity"], "high");
    assert_eq!(finding["fails"], true);
    assert!(finding["evidence"]["process"]["exe"].as_str().unwrap().ends_with("driftwatch-demo-service"));
    assert!(finding["resolution"].as_str().unwrap().contains(&format!("port: {port}")), "{finding}");
    assert_eq!(report["verdict"], "findings");
}

#[test]
fn fail_on_sets_the_threshold() {
    let setup = Setup::new();
    let command = setup.connect_once(setup.undeclared.addr);
    for (fail_on, expected) in [("low", 1), ("high", 1), ("critical", 0)] {
        let run = setup.check(&["--format", "json", "--fail-on", fail_on], &command);
        assert_eq!(run.code(), expected, "--fail-on {fail_on}\n{}", run.describe());
        let report = run.json();
        assert!(!deviation_ids(&report).is_empty(), "--fail-on {fail_on} still reports the findings");
        let summary = report["summary"].as_str().unwrap();
        assert!(summary.ends_with(&format!("at --fail-on {fail_on}")), "{summary}");
    }
}

#[test]
fn failing_command_is_told_apart_from_findings() {
    let setup = Setup::new();
    let run = setup.check(&["--format", "json"], &["/bin/sh".into(), "-c".into(), "exit 7".into()]);
    assert_eq!(run.code(), 2, "{}", run.describe());
    let report = run.json();
    assert_eq!(report["command_status"]["exited"], 7);
    assert_eq!(report["verdict"], "command-failed");
    assert_eq!(deviation_ids(&report), Vec::<String>::new());

    // Both at once: the command's failure decides the exit status, the finding is still reported.
    let connect = setup.connect_once(setup.undeclared.addr).join(" ");
    let run = setup.check(&["--format", "json"], &["/bin/sh".into(), "-c".into(), format!("{connect}; exit 7")]);
    assert_eq!(run.code(), 2, "{}", run.describe());
    let report = run.json();
    let port = setup.undeclared.addr.port();
    assert!(deviation_ids(&report).contains(&format!("unexpected-flow@app@loopback@tcp/{port}")), "{}", run.describe());
    assert!(report["summary"].as_str().unwrap().contains("failing because the command exited with status 7"));
}

#[test]
fn command_not_found_is_a_command_failure() {
    let setup = Setup::new();
    let run = setup.check(&[], &["/nonexistent/driftwatch-test-command".into()]);
    assert_eq!(run.code(), 2, "{}", run.describe());
    assert!(run.stdout.contains("could not be started"), "{}", run.describe());
}

#[test]
fn busy_processes_outside_the_command_are_ignored() {
    let setup = Setup::new();
    // The same program as the command, matching component app, connecting to the undeclared
    // listener in a loop for as long as the check runs, but started by the test outside the
    // command's cgroup.
    let loop_script = format!("while true; do {}; done", setup.connect_once(setup.undeclared.addr).join(" "));
    let mut outside = Command::new("/bin/sh");
    outside.args(["-c", &loop_script]);
    let mut busy = spawn_in(None, None, outside).unwrap();
    let before = setup.undeclared.accepted();

    let graph_path = setup.path("graph.json");
    let run = setup.check(&["--format", "json", "--record", graph_path.to_str().unwrap()], &setup.connect_once(setup.declared.addr));
    let during = setup.undeclared.accepted() - before;
    busy.kill();

    assert!(during > 0, "the outside loop made no connection while the check ran");
    assert_eq!(run.code(), 0, "{} outside connections leaked into the check\n{}", during, run.describe());
    assert_eq!(deviation_ids(&run.json()), Vec::<String>::new());
    let graph = read_graph(&graph_path);
    assert_eq!(edges_to_port(&graph, setup.undeclared.addr.port()), Vec::new(), "{graph}");
    assert_eq!(edges_to_port(&graph, setup.declared.addr.port()).len(), 1, "{graph}");
}

#[test]
fn invalid_model_exits_three_with_locations() {
    let setup = Setup::new();
    fs::write(setup.model.path(), "version: 1\ncomponents:\n  - id: app\n    zone: nowhere\n").unwrap();
    let run = setup.check(&[], &["/bin/true".into()]);
    assert_eq!(run.code(), 3, "{}", run.describe());
    let location = format!("{}:4:", setup.model.path().display());
    assert!(run.stderr.contains(&location), "expected an error at {location}\n{}", run.describe());
}

#[test]
fn sarif_report_validates_against_schema() {
    let setup = Setup::new();
    let sarif_path = setup.path("report.sarif");
    let run = setup.check(
        &["--format", "sarif", "--output", sarif_path.to_str().unwrap()],
        &setup.connect_once(setup.undeclared.addr),
    );
    assert_eq!(run.code(), 1, "{}", run.describe());
    let sarif: Value = serde_json::from_str(&fs::read_to_string(&sarif_path).unwrap()).unwrap();

    let schema_path = sarif_schema_path();
    let schema: Value = serde_json::from_str(&fs::read_to_string(&schema_path).unwrap()).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    let url = format!("file://{}", schema_path.display());
    compiler.add_resource(&url, schema).unwrap();
    let index = compiler.compile(&url, &mut schemas).unwrap();
    if let Err(error) = schemas.validate(&sarif, index) {
        panic!("the SARIF report does not validate against {}:\n{error:#}\n{sarif:#}", schema_path.display());
    }
    // The validator rejects what the schema forbids, so the pass above means something.
    let mut broken = sarif.clone();
    broken["runs"][0]["results"][0]["level"] = Value::from("severe");
    assert!(schemas.validate(&broken, index).is_err(), "a result level outside the SARIF enum validated");

    // The finding concerns component app, declared on line 6 with `id` at column 5.
    let port = setup.undeclared.addr.port();
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    let result = results
        .iter()
        .find(|r| r["partialFingerprints"]["deviationId/v1"] == format!("unexpected-flow@app@loopback@tcp/{port}").as_str())
        .unwrap_or_else(|| panic!("no unexpected-flow result in {sarif:#}"));
    assert_eq!(result["level"], "error");
    assert_eq!(result["locations"][0]["physicalLocation"]["region"], serde_json::json!({ "startLine": 6, "startColumn": 5 }));
}

/// Finds `src/schema.json` of the serde-sarif package, which ships the SARIF 2.1.0 schema, through
/// `cargo metadata`, so the test reads the copy that cargo downloaded with the package.
fn sarif_schema_path() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // Offline, cargo can list only the packages it has, so the listing is limited to this host's.
    let rustc = Command::new("rustc").arg("-vV").output().expect("rustc runs");
    let rustc = String::from_utf8_lossy(&rustc.stdout).into_owned();
    let host = rustc.lines().find_map(|line| line.strip_prefix("host: ")).expect("rustc -vV names the host");
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", host, "--manifest-path"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let package = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|package| package["name"] == "serde-sarif")
        .expect("serde-sarif is a dev-dependency of this crate");
    let manifest_path = PathBuf::from(package["manifest_path"].as_str().unwrap());
    manifest_path.parent().unwrap().join("src").join("schema.json")
}
