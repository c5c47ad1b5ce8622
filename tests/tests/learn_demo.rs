//! Acceptance of `driftwatch model learn`: learned from the demo system's normal traffic on a live
//! agent, the model accepts that traffic and still flags the demo's intrusion.
//!
//! It needs root and `DRIFTWATCH_BIN` (set by `cargo xtask test`).

use std::fs;
use std::process::Command;
use std::time::Duration;

use driftwatch_e2e::demo::{intrusion_command, DemoSystem, ADDRESSES};
use driftwatch_e2e::stream::{self, describe_all, process_of};
use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, unique_suffix, wait_until, DeviationWatcher,
};
use driftwatch_model::Model;
use driftwatch_proto::v1::{Category, Deviation, Graph};

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const REQUESTS: u32 = 10;

/// A model that declares nothing, so every process the agent observes is discovered.
const BLANK_MODEL: &str = "version: 1\nzones: []\ncomponents: []\nflows: []\n";

fn run_client(system: &DemoSystem, service: &std::path::Path, args: &[&str]) -> Vec<String> {
    let mut client = system.client(service, args).unwrap();
    client.wait_success(CLIENT_TIMEOUT).unwrap()
}

/// Waits until three edges each carry every request: into web, web -> api and api -> db.
fn wait_for_requests(system: &DemoSystem, web: &str, api: &str, db: &str) -> Graph {
    let expected = [(web, 8080), (api, 8081), (db, 5432)];
    let mut last = Graph::default();
    let found = wait_until(OBSERVE_TIMEOUT, || {
        last = stream::graph(system.agent.api_addr()).ok()?;
        let complete = expected.iter().all(|(destination, port)| {
            last.edges.iter().any(|edge| {
                edge.destination == *destination
                    && edge.port == *port
                    && edge.connections >= u64::from(REQUESTS)
            })
        });
        complete.then(|| last.clone())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the graph does not show {REQUESTS} connections into {web}, {api} and {db}: {:#?}\nagent log:\n{}",
            last.edges,
            system.agent.log()
        )
    })
}

#[test]
fn learned_demo_model_flags_only_intrusion() {
    require_root().unwrap();
    let bin = driftwatch_bin().unwrap();
    let service = demo_service_bin().unwrap();
    let root = format!("/dw-hA-learn-{}", unique_suffix());
    let dir = tempfile::Builder::new().prefix("dw-hA-learn").tempdir().unwrap();
    let blank = dir.path().join("blank.yaml");
    fs::write(&blank, BLANK_MODEL).unwrap();
    let learned_path = dir.path().join("learned.yaml");

    // Learning: the demo's normal traffic under a model that declares nothing.
    {
        let system = DemoSystem::start(&bin, &service, &blank, &root, "hA", &[]).unwrap();
        run_client(&system, &service, &["--requests", &REQUESTS.to_string()]);
        let web = format!("unknown:cgroup:{root}/web");
        let api = format!("unknown:cgroup:{root}/api");
        let db = format!("unknown:cgroup:{root}/db");
        let graph = wait_for_requests(&system, &web, &api, &db);
        let web_node = graph.nodes.iter().find(|n| n.id == web).unwrap();
        assert_eq!(web_node.processes.len(), 1, "{web_node:#?}");
        assert_eq!(web_node.processes[0].cgroup, format!("{root}/web"));
        assert_eq!(web_node.processes[0].exe, service.display().to_string());

        let output = Command::new(&bin)
            .args(["model", "learn", "--api", &system.agent.api_arg(), "--duration", "1s", "-o"])
            .arg(&learned_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        println!("model learn: {stderr}");
        assert!(
            stderr.contains("learned 3 zones, 3 components and 3 flows"),
            "{stderr}\n{}",
            fs::read_to_string(&learned_path).unwrap_or_default()
        );
    }

    let learned = fs::read_to_string(&learned_path).unwrap();
    println!("learned model:\n{learned}");
    let model = Model::load(&learned_path).unwrap_or_else(|errors| panic!("{errors}\n{learned}"));
    let web = model.component("web").expect("a component for the web tier");
    assert!(web.exposed);
    assert_eq!(web.listens.iter().map(|l| l.port).collect::<Vec<_>>(), [8080]);
    assert_eq!(web.executables.patterns, [service.display().to_string()]);
    let db = model.component("db").expect("a component for the db tier");
    assert!(!db.exposed);
    assert_eq!(db.listens.iter().map(|l| l.port).collect::<Vec<_>>(), [5432]);
    let client_zone = format!("net-{}", ADDRESSES.client.to_string().replace('.', "-"));
    let flows: Vec<(String, String, Vec<u16>)> = model
        .flows
        .iter()
        .map(|f| (f.from.clone(), f.to.clone(), f.ports.clone()))
        .collect();
    assert_eq!(
        flows,
        [
            ("api".to_string(), "db".to_string(), vec![5432]),
            (client_zone, "web".to_string(), vec![8080]),
            ("web".to_string(), "api".to_string(), vec![8081]),
        ]
    );

    // The learned model in force: normal traffic raises nothing.
    let system = DemoSystem::start(&bin, &service, &learned_path, &root, "hA", &[]).unwrap();
    let watcher = DeviationWatcher::subscribe(system.agent.api_addr()).unwrap();
    run_client(&system, &service, &["--requests", &REQUESTS.to_string()]);
    let graph = wait_for_requests(&system, "web", "api", "db");
    assert!(graph.edges.iter().all(|e| e.declared), "{:#?}", graph.edges);
    let status = stream::status(system.agent.api_addr()).unwrap();
    assert_eq!(
        status.last_sequence,
        0,
        "normal traffic raised deviations under the learned model:\n{}",
        describe_all(&watcher.deviations())
    );

    // The intrusion still raises its deviations.
    run_client(&system, &service, &["--exec", &intrusion_command(&service)]);
    let wait = |what: &str, accept: &dyn Fn(&Deviation) -> bool| {
        watcher
            .wait_for(what, OBSERVE_TIMEOUT, accept)
            .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", system.agent.log()))
    };
    let is = |d: &Deviation, category: Category| d.category == category as i32;
    wait("unexpected-executable for bash in web", &|d| {
        is(d, Category::UnexpectedExecutable)
            && d.source == "web"
            && process_of(d).is_some_and(|(_, exe)| exe.ends_with("/bash"))
    });
    wait("unexpected-flow web -> db", &|d| d.id == "unexpected-flow@web@db@tcp/5432");
    wait("trust-boundary-crossing web -> db", &|d| {
        is(d, Category::TrustBoundaryCrossing) && d.source == "web" && d.destination == "db"
    });
    let ext = format!("{}:9999", ADDRESSES.ext);
    wait("unexpected-flow to the undeclared host", &|d| {
        is(d, Category::UnexpectedFlow)
            && d.source == "web"
            && d.evidence.as_ref().is_some_and(|e| e.remote_addr == ext)
    });
    wait("unattributed-endpoint for the undeclared host", &|d| {
        is(d, Category::UnattributedEndpoint) && d.destination == format!("external:{}", ADDRESSES.ext)
    });
    wait("new-listener on 4444 in web", &|d| {
        is(d, Category::NewListener) && d.source == "web" && d.port == Some(4444)
    });
    let raised = stream::status(system.agent.api_addr()).unwrap().last_sequence;
    wait_until(OBSERVE_TIMEOUT, || (watcher.last_sequence() >= raised).then_some(()))
        .expect("the deviation stream did not catch up");
    println!(
        "the intrusion raised {} deviations under the learned model:\n{}",
        watcher.deviations().len(),
        describe_all(&watcher.deviations())
    );
}
