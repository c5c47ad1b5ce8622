//! End-to-end tests of the model engine on the demo system: model reloads (file change and API),
//! exceptions with wildcard ids and expiry, and a new attack path reported hop by hop.
//!
//! Each test runs the demo's web, api and db tiers in network namespaces and cgroups of their own,
//! the agent scoped to them, and the internet client sending requests through web -> api -> db.
//! They need root and `DRIFTWATCH_BIN` (set by `cargo xtask test`), and run one at a time.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use driftwatch_e2e::demo::{DemoSystem, ADDRESSES};
use driftwatch_e2e::stream::{self, describe_all};
use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, unique_suffix, wait_until, DeviationWatcher,
};
use driftwatch_proto::v1::agent_service_client::AgentServiceClient;
use driftwatch_proto::v1::reload_model_response::Outcome;
use driftwatch_proto::v1::{Category, Deviation, Graph, ReloadModelRequest, ReloadModelResponse};

/// How long the agent may take to turn a kernel event into a deviation, an edge or a reload.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

static AGENT_TESTS: Mutex<()> = Mutex::new(());

/// The demo's zones and components, selected by the cgroups under `{ROOT}`, with the flows that
/// `{FLOWS}` lists and the exceptions `{EXCEPTIONS}` lists.
const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: dmz, trust: 40, match: { cidrs: ["198.18.2.0/24"] } }
  - { id: app, trust: 60, match: { cidrs: ["198.18.3.0/24"] } }
  - { id: core, trust: 80, match: { cidrs: ["198.18.4.0/24"] } }
components:
  - id: web
    zone: dmz
    exposed: true
    match: { cgroup: ["{ROOT}/web"] }
    listens: [{ port: 8080 }]
    executables: ["**/driftwatch-demo-service"]
  - id: api
    zone: app
    match: { cgroup: ["{ROOT}/api"] }
    listens: [{ port: 8081 }]
    executables: ["**/driftwatch-demo-service"]
  - id: db
    zone: core
    criticality: {DB_CRITICALITY}
    match: { cgroup: ["{ROOT}/db"] }
    listens: [{ port: 5432 }]
    executables: ["**/driftwatch-demo-service"]
flows:
{FLOWS}exceptions:
{EXCEPTIONS}"#;

const INTERNET_TO_WEB: &str = "  - { from: internet, to: web, port: 8080 }\n";
const WEB_TO_API: &str = "  - { from: web, to: api, port: 8081 }\n";
const API_TO_DB: &str = "  - { from: api, to: db, port: 5432 }\n";

/// The demo system under one test's model, and a subscription to every deviation.
struct Demo {
    watcher: DeviationWatcher,
    system: DemoSystem,
    model: PathBuf,
    root: String,
    service: PathBuf,
    _dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// Fills in [`MODEL`].
fn model_text(root: &str, db_criticality: &str, flows: &[&str], exceptions: &str) -> String {
    let exceptions = if exceptions.is_empty() {
        "  []\n".to_string()
    } else {
        exceptions.to_string()
    };
    MODEL
        .replace("{ROOT}", root)
        .replace("{DB_CRITICALITY}", db_criticality)
        .replace("{FLOWS}", &flows.concat())
        .replace("{EXCEPTIONS}", &exceptions)
        .replace("exceptions:\n  []\n", "exceptions: []\n")
}

impl Demo {
    /// Starts the demo system with the model that `text` builds from the test's cgroup root.
    fn start(text: impl Fn(&str) -> String, agent_args: &[&str]) -> Demo {
        let serial = AGENT_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let bin = driftwatch_bin().unwrap();
        let service = demo_service_bin().unwrap();
        let root = format!("/dw-hA-{}", unique_suffix());
        let dir = tempfile::Builder::new().prefix("dw-hA-model").tempdir().unwrap();
        let model = dir.path().join("model.yaml");
        fs::write(&model, text(&root)).unwrap();
        let system = DemoSystem::start(&bin, &service, &model, &root, "hA", agent_args).unwrap();
        let watcher = DeviationWatcher::subscribe(system.agent.api_addr()).unwrap();
        Demo {
            watcher,
            system,
            model,
            root,
            service,
            _dir: dir,
            _serial: serial,
        }
    }

    fn api(&self) -> SocketAddr {
        self.system.agent.api_addr()
    }

    /// Sends `requests` requests from the internet client through web -> api -> db.
    fn requests(&self, requests: u32) {
        let mut client = self
            .system
            .client(&self.service, &["--requests", &requests.to_string()])
            .unwrap();
        client.wait_success(CLIENT_TIMEOUT).unwrap();
    }

    fn pid_of(&self, service: &str) -> u32 {
        self.system
            .services()
            .find(|(name, _)| *name == service)
            .map(|(_, pid)| pid)
            .unwrap_or_else(|| panic!("no service {service}"))
    }

    /// Waits until the graph shows at least `connections` on the edge `source -> destination`.
    fn wait_for_edge(&self, source: &str, destination: &str, connections: u64) -> Graph {
        let mut last = Graph::default();
        let found = wait_until(OBSERVE_TIMEOUT, || {
            last = stream::graph(self.api()).ok()?;
            last.edges
                .iter()
                .any(|e| {
                    e.source == source && e.destination == destination && e.connections >= connections
                })
                .then(|| last.clone())
        });
        found.unwrap_or_else(|| {
            panic!(
                "no edge {source} -> {destination} with {connections} connections; graph edges: {:#?}\nagent log:\n{}",
                last.edges,
                self.system.agent.log()
            )
        })
    }

    fn wait_for(&self, what: &str, accept: impl Fn(&Deviation) -> bool) -> Deviation {
        self.watcher
            .wait_for(what, OBSERVE_TIMEOUT, accept)
            .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", self.system.agent.log()))
    }

    /// Returns the value of a status counter.
    fn counter(&self, name: &str) -> u64 {
        let status = stream::status(self.api()).unwrap();
        status
            .counters
            .iter()
            .find(|counter| counter.name == name)
            .map(|counter| counter.value)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Waits until the agent has put `reloads` models in force since it started.
    fn wait_for_reloads(&self, reloads: u64) {
        let done = wait_until(OBSERVE_TIMEOUT, || {
            (self.counter("engine_model_reloads") >= reloads).then_some(())
        });
        done.unwrap_or_else(|| {
            panic!(
                "the agent did not reload the model {reloads} time(s); its log:\n{}",
                self.system.agent.log()
            )
        });
    }

    /// Waits until the watcher has received every deviation the agent raised so far.
    fn catch_up(&self) -> Vec<Deviation> {
        let raised = stream::status(self.api()).unwrap().last_sequence;
        wait_until(OBSERVE_TIMEOUT, || {
            (self.watcher.last_sequence() >= raised).then_some(())
        })
        .expect("the deviation stream did not catch up");
        self.watcher.deviations()
    }
}

fn is(deviation: &Deviation, category: Category) -> bool {
    deviation.category == category as i32
}

fn ids(deviations: &[Deviation]) -> Vec<&str> {
    deviations.iter().map(|d| d.id.as_str()).collect()
}

/// Writes `text` next to `path` and renames it over `path`, as editors that save atomically do.
fn replace_file(path: &Path, text: &str) {
    let partial = path.with_extension("yaml.swp");
    fs::write(&partial, text).unwrap();
    fs::rename(&partial, path).unwrap();
}

fn reload_over_api(api: SocketAddr) -> ReloadModelResponse {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = AgentServiceClient::connect(format!("http://{api}"))
            .await
            .unwrap();
        client
            .reload_model(ReloadModelRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()[..64].to_string()
}

#[test]
fn file_change_rejudges_observed_flows() {
    let demo = Demo::start(
        |root| model_text(root, "medium", &[INTERNET_TO_WEB, WEB_TO_API], ""),
        &[],
    );
    demo.requests(1);
    demo.wait_for("unexpected-flow api -> db before the reload", |d| {
        d.id == "unexpected-flow@api@db@tcp/5432"
    });
    demo.wait_for_edge("web", "api", 1);
    let before = demo.catch_up().len();

    // The new model allows api -> db and no longer allows web -> api. The file is absent for a
    // moment first, as between an editor's unlink and rename.
    fs::remove_file(&demo.model).unwrap();
    wait_until(OBSERVE_TIMEOUT, || {
        demo.system
            .agent
            .log()
            .contains("the model file is absent")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the agent did not notice the absent file:\n{}", demo.system.agent.log()));
    replace_file(
        &demo.model,
        &model_text(&demo.root, "medium", &[INTERNET_TO_WEB, API_TO_DB], ""),
    );
    demo.wait_for_reloads(1);

    // The web -> api edge observed before the reload is raised by the reload itself.
    let web_to_api = demo.wait_for("unexpected-flow web -> api after the reload", |d| {
        d.id == "unexpected-flow@web@api@tcp/8081"
    });
    let evidence = web_to_api.evidence.unwrap();
    assert_eq!(evidence.process.unwrap().pid, demo.pid_of("web"));
    assert_eq!(evidence.peer_process.unwrap().pid, demo.pid_of("api"));

    // api -> db is declared now: more traffic on it raises nothing new.
    demo.requests(1);
    let graph = demo.wait_for_edge("api", "db", 2);
    let api_to_db = graph
        .edges
        .iter()
        .find(|e| e.source == "api" && e.destination == "db")
        .unwrap();
    assert!(api_to_db.declared);
    let after = demo.catch_up();
    let new: Vec<Deviation> = after[before..].to_vec();
    assert!(
        new.iter().all(|d| d.source != "api" || d.destination != "db"),
        "api -> db raised after the model declared it:\n{}",
        describe_all(&new)
    );
    assert_eq!(demo.counter("engine_model_reloads"), 1);
    let status = stream::status(demo.api()).unwrap();
    assert_eq!(status.model.unwrap().flows, 2);
}

#[test]
fn api_reload_rejects_invalid_then_accepts() {
    let demo = Demo::start(
        |root| model_text(root, "medium", &[INTERNET_TO_WEB, WEB_TO_API], ""),
        &["--no-model-watch"],
    );
    demo.requests(1);
    demo.wait_for("unexpected-flow api -> db", |d| {
        d.id == "unexpected-flow@api@db@tcp/5432"
    });

    // Line 15 names a zone that does not exist, and line 20 has a key the schema does not know.
    let valid = model_text(&demo.root, "medium", &[INTERNET_TO_WEB, API_TO_DB], "");
    let invalid = valid
        .replace("    zone: app\n", "    zone: backend\n")
        .replace("  - id: db\n", "  - id: db\n    replicas: 3\n");
    fs::write(&demo.model, &invalid).unwrap();
    let response = reload_over_api(demo.api());
    let Some(Outcome::Rejected(rejected)) = response.outcome else {
        panic!("an invalid model was not rejected: {response:?}");
    };
    let mut errors = rejected.errors.clone();
    errors.sort_by_key(|e| (e.line, e.column));
    let places: Vec<(u32, u32)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(places, [(15, 11), (20, 5)], "{errors:#?}");
    assert!(errors.iter().all(|e| e.file == demo.model.display().to_string()));
    assert!(errors[0].message.contains("unknown zone \"backend\""), "{errors:#?}");
    assert!(errors[1].message.contains("unknown key \"replicas\""), "{errors:#?}");
    assert!(errors.iter().all(|e| !e.hint.is_empty()), "{errors:#?}");
    assert_eq!(rejected.model_in_force.unwrap().flows, 2);
    assert_eq!(demo.counter("engine_model_reloads"), 0);

    // The model in force still raises what it did: a new connection api -> db counts on.
    fs::write(&demo.model, &valid).unwrap();
    let output = Command::new(driftwatch_bin().unwrap())
        .args(["model", "reload", "--api", &demo.api().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], format!("accepted {}", demo.model.display()));
    assert_eq!(lines[1], format!("  sha256 {}", sha256_of(&demo.model)));
    assert_eq!(lines[2], "  4 zone(s), 3 component(s), 2 flow(s), 0 exception(s)");
    // The observed web -> api edge is undeclared now: unexpected-flow and trust-boundary-crossing.
    assert_eq!(
        lines[3],
        "  2 deviation(s) raised by judging what was already observed against it"
    );
    demo.wait_for("trust-boundary-crossing web -> api after the reload", |d| {
        d.id == "trust-boundary-crossing@web@api@tcp/8081"
    });
    assert_eq!(demo.counter("engine_model_reloads"), 1);

    // The same file again changes nothing.
    let response = reload_over_api(demo.api());
    let Some(Outcome::Accepted(accepted)) = response.outcome else {
        panic!("an unchanged model was not accepted: {response:?}");
    };
    assert!(accepted.unchanged);
    assert_eq!(accepted.digest, sha256_of(&demo.model));
    assert_eq!(demo.counter("engine_model_reloads"), 1);
}

/// Exceptions that cover the undeclared api -> db flow, expiring on `expires`.
fn api_db_exception(expires: &str) -> String {
    format!(
        "  - {{ id: \"*@api@db@tcp/*\", reason: \"reporting job, OPS-7\", expires: {expires} }}\n"
    )
}

#[test]
fn wildcard_exception_suppresses_flow() {
    let demo = Demo::start(
        |root| {
            model_text(
                root,
                "medium",
                &[INTERNET_TO_WEB, WEB_TO_API],
                &api_db_exception("2099-01-01"),
            )
        },
        &[],
    );
    demo.requests(1);
    let graph = demo.wait_for_edge("api", "db", 1);
    assert!(!graph.edges.iter().find(|e| e.destination == "db").unwrap().declared);
    // unexpected-flow and trust-boundary-crossing (app to core) for the one connection.
    wait_until(OBSERVE_TIMEOUT, || {
        (demo.counter("engine_deviations_suppressed") == 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "suppressed {} deviations",
            demo.counter("engine_deviations_suppressed")
        )
    });
    let raised = demo.catch_up();
    assert!(raised.is_empty(), "{}", describe_all(&raised));
    assert_eq!(stream::status(demo.api()).unwrap().last_sequence, 0);
    assert_eq!(demo.counter("engine_expired_exception_matches"), 0);
}

#[test]
fn expired_exception_raises_flow_and_reports() {
    let demo = Demo::start(
        |root| {
            model_text(
                root,
                "medium",
                &[INTERNET_TO_WEB, WEB_TO_API],
                &api_db_exception("2020-01-01"),
            )
        },
        &[],
    );
    // The agent reports the expired exception when it loads the model.
    let log = demo.system.agent.log();
    let exception_line = 29;
    let expected = format!(
        "{}:{exception_line}:5: warning: exception \"*@api@db@tcp/*\" expired on 2020-01-01 and no longer suppresses deviations",
        demo.model.display()
    );
    assert!(log.contains(&expected), "no {expected:?} in the agent log:\n{log}");

    demo.requests(1);
    let flow = demo.wait_for("unexpected-flow api -> db", |d| {
        d.id == "unexpected-flow@api@db@tcp/5432"
    });
    let note = format!(
        "(the exception \"*@api@db@tcp/*\" at line {exception_line} covered this until it expired on 2020-01-01)"
    );
    assert!(flow.summary.ends_with(&note), "{}", flow.summary);
    let evidence = flow.evidence.unwrap();
    assert_eq!(evidence.process.unwrap().pid, demo.pid_of("api"));
    assert_eq!(evidence.remote_addr, format!("{}:5432", ADDRESSES.db));
    demo.wait_for("trust-boundary-crossing api -> db", |d| {
        d.id == "trust-boundary-crossing@api@db@tcp/5432"
    });
    assert_eq!(demo.counter("engine_expired_exception_matches"), 2);
    assert_eq!(demo.counter("engine_deviations_suppressed"), 0);
}

#[test]
fn attack_path_reported_hop_by_hop() {
    let demo = Demo::start(
        |root| model_text(root, "high", &[INTERNET_TO_WEB, WEB_TO_API], ""),
        &[],
    );
    demo.requests(1);
    let path = demo.wait_for("new-attack-path to db", |d| is(d, Category::NewAttackPath));
    let service = demo.service.display().to_string();
    assert_eq!(path.id, "new-attack-path@web@db@tcp/8081");
    assert_eq!(
        path.summary,
        format!(
            "observed traffic opens a path from web to db (high criticality) that the declared flows do not allow: \
             1. web -> api on tcp/8081 (declared, by {service} (pid {web})); \
             2. api -> db on tcp/5432 (undeclared, by {service} (pid {api}))",
            web = demo.pid_of("web"),
            api = demo.pid_of("api"),
        )
    );
    assert_eq!(
        path.resolution,
        "# If every hop is intended, declare the undeclared ones; otherwise deny the first one.\nflows:\n  - { from: api, to: db, port: 5432 }\n"
    );
    let raised = demo.catch_up();
    let paths: Vec<&Deviation> = raised.iter().filter(|d| is(d, Category::NewAttackPath)).collect();
    assert_eq!(paths.len(), 1, "{}", describe_all(&raised));
    assert_eq!(
        ids(&raised).iter().filter(|id| id.contains("@api@db@")).count(),
        2,
        "{}",
        describe_all(&raised)
    );
}
