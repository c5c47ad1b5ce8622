//! End-to-end tests of the fleet: three agents, each scoped to its own cgroup with its workload in
//! its own network namespace acting as a host, pushing to one collector, and clients of the
//! collector's API.
//!
//! They need root and `DRIFTWATCH_BIN` (set by `cargo xtask test`), and run one at a time because
//! each loads the eBPF programs three times.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use driftwatch_e2e::stream::{self, describe_all, StreamEntry};
use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, spawn_in, unique_suffix, wait_until,
    AgentUnderTest, Cgroup, CollectorUnderTest, DeviationWatcher, ProcessGuard, Topology,
};
use driftwatch_proto::v1::{self as pb, AgentStatus, Category};

/// How long an event may take to travel from the kernel through an agent to the collector.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(30);
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

const WEB_V4: &str = "198.18.2.10";
const DB_V4: &str = "198.18.4.10";
const OPS_V4: &str = "198.18.6.10";

/// web, db and ops, each selected by its cgroup; web may reach db. `{ROOT}` becomes the test's
/// cgroup.
const MODEL: &str = r#"version: 1
zones:
  - { id: dmz, trust: 40 }
  - { id: core, trust: 80 }
components:
  - id: web
    zone: dmz
    match: { cgroup: ["{ROOT}/web"] }
    executables: ["**/driftwatch-demo-service"]
  - id: db
    zone: core
    match: { cgroup: ["{ROOT}/db"] }
    listens: [{ port: 5432 }]
    executables: ["**/driftwatch-demo-service"]
  - id: ops
    zone: core
    match: { cgroup: ["{ROOT}/ops"] }
    executables: ["**/driftwatch-demo-service"]
flows:
  - { from: web, to: db, port: 5432 }
exceptions: []
"#;

static FLEET_TESTS: Mutex<()> = Mutex::new(());

/// The hosts web, db and ops with one agent each, named `<host>-1`, and the collector they push to.
/// Fields drop in declaration order: processes first, then agents, collector, cgroups, namespaces.
struct Fleet {
    processes: Vec<ProcessGuard>,
    agents: BTreeMap<&'static str, AgentUnderTest>,
    collector: CollectorUnderTest,
    cgroups: BTreeMap<&'static str, Cgroup>,
    root: Cgroup,
    topology: Topology,
    service: PathBuf,
    _model: tempfile::NamedTempFile,
    _serial: MutexGuard<'static, ()>,
}

const HOSTS: [(&str, &str); 3] = [("web", WEB_V4), ("db", DB_V4), ("ops", OPS_V4)];

impl Fleet {
    fn start() -> Fleet {
        let serial = FLEET_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let bin = driftwatch_bin().unwrap();
        let service = demo_service_bin().unwrap();

        let mut topology = Topology::new().unwrap();
        for (index, (host, v4)) in HOSTS.iter().enumerate() {
            let v6 = format!("fd00:e5:{}::10/64", index + 1);
            topology.add_host(host, &format!("{v4}/24"), &v6).unwrap();
        }
        let root = Cgroup::create(&format!("dw-hE-fleet-{}", unique_suffix())).unwrap();
        let cgroups: BTreeMap<&'static str, Cgroup> =
            HOSTS.iter().map(|(host, _)| (*host, root.child(host).unwrap())).collect();
        let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        fs::write(model.path(), MODEL.replace("{ROOT}", root.relative_path())).unwrap();

        let collector = CollectorUnderTest::start().unwrap();
        let collector_addr = collector.addr().to_string();
        let mut agents = BTreeMap::new();
        for (host, v4) in HOSTS {
            let node = format!("{host}-1");
            let args = [
                "--collector",
                collector_addr.as_str(),
                "--node",
                node.as_str(),
                "--advertise-address",
                v4,
                "--snapshot-interval",
                "0.2",
            ];
            let agent = AgentUnderTest::start_with(&bin, model.path(), cgroups[host].path(), &args).unwrap();
            agents.insert(host, agent);
        }
        let fleet = Fleet {
            processes: Vec::new(),
            agents,
            collector,
            cgroups,
            root,
            topology,
            service,
            _model: model,
            _serial: serial,
        };
        fleet.wait_all_connected();
        fleet
    }

    fn wait_all_connected(&self) {
        let connected = wait_until(OBSERVE_TIMEOUT, || {
            let status = stream::status(self.collector.addr()).ok()?;
            (status.nodes.iter().filter(|node| node.connected).count() == HOSTS.len()).then_some(())
        });
        connected.unwrap_or_else(|| panic!("not every agent connected to the collector\n{}", self.logs()));
    }

    fn service_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.service);
        command.args(args);
        command
    }

    fn spawn(&self, host: &str, command: Command) -> ProcessGuard {
        spawn_in(Some(&self.topology.host(host).netns), Some(&self.cgroups[host]), command).unwrap()
    }

    /// Starts a service on `host` and waits until it listens.
    fn serve(&mut self, host: &str, args: &[&str]) {
        let process = self.spawn(host, self.service_command(args));
        process.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
        self.processes.push(process);
    }

    /// Runs a program on `host` until it exits successfully.
    fn run(&self, host: &str, command: Command) {
        let mut process = self.spawn(host, command);
        process.wait_success(RUN_TIMEOUT).unwrap();
    }

    fn collector_api(&self) -> SocketAddr {
        self.collector.addr()
    }

    /// Waits until every agent's collector has acknowledged everything the agent raised, and
    /// returns the agents' statuses by host.
    fn wait_all_acknowledged(&self) -> BTreeMap<&'static str, AgentStatus> {
        let mut statuses = BTreeMap::new();
        for (host, agent) in &self.agents {
            let mut last = None;
            let done = wait_until(OBSERVE_TIMEOUT, || {
                let status = stream::status(agent.api_addr()).ok()?;
                let acknowledged = counter(&status, "collector_acknowledged_sequence");
                last = Some((status.last_sequence, acknowledged));
                (acknowledged == status.last_sequence).then_some(status)
            });
            let status = done.unwrap_or_else(|| {
                panic!("agent {host} never had everything acknowledged (last sequence, acknowledged): {last:?}\n{}", self.logs())
            });
            statuses.insert(*host, status);
        }
        statuses
    }

    fn logs(&self) -> String {
        let mut text = format!("collector log:\n{}\n", self.collector.log());
        for (host, agent) in &self.agents {
            text.push_str(&format!("agent {host} log:\n{}\n", agent.log()));
        }
        text
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.processes.clear();
        let _ = self.root.kill_remaining();
    }
}

fn counter(status: &AgentStatus, name: &str) -> u64 {
    status.counters.iter().find(|counter| counter.name == name).map_or(0, |counter| counter.value)
}

/// Returns (node, deviation id, count) of each entry, sorted, so that two streams compare as
/// multisets: a missing deviation or a duplicate shows as a difference.
fn keyed(entries: &[StreamEntry]) -> Vec<(String, String, u64)> {
    let mut keys: Vec<(String, String, u64)> = entries
        .iter()
        .map(|entry| (entry.node.clone(), entry.deviation.id.clone(), entry.deviation.count))
        .collect();
    keys.sort();
    keys
}

fn describe_entries(entries: &[StreamEntry]) -> String {
    entries
        .iter()
        .map(|entry| format!("  #{} {} {}", entry.sequence, entry.node, stream::describe(&entry.deviation)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `watcher` has received at least `count` deviations that satisfy `accept`.
fn wait_count(fleet: &Fleet, watcher: &DeviationWatcher, count: usize, what: &str, accept: impl Fn(&StreamEntry) -> bool) {
    let reached = wait_until(OBSERVE_TIMEOUT, || {
        (watcher.entries().iter().filter(|entry| accept(entry)).count() >= count).then_some(())
    });
    reached.unwrap_or_else(|| {
        panic!(
            "fewer than {count} {what}; received:\n{}\nended: {:?}\n{}",
            describe_entries(&watcher.entries()),
            watcher.ended(),
            fleet.logs()
        )
    });
}

fn is_new_listener_on(entry: &StreamEntry, node: &str) -> bool {
    entry.node == node && entry.deviation.category == Category::NewListener as i32
}

#[test]
fn cross_host_flow_is_one_edge() {
    let mut fleet = Fleet::start();
    fleet.serve("db", &["db", "--listen", "0.0.0.0:5432"]);
    fleet.run(
        "web",
        fleet.service_command(&["client", "--target", &format!("{DB_V4}:5432"), "--requests", "3"]),
    );

    // Either agent's half alone can show one web -> db edge (the db agent's model names the
    // client's zone web), so the merge is complete only once both snapshots are in: the client's
    // half resolved and the server's half deduplicated.
    let mut graph = pb::Graph::default();
    let mut merge = (0, 0);
    let merged = wait_until(OBSERVE_TIMEOUT, || {
        graph = stream::graph(fleet.collector_api()).ok()?;
        let status = stream::status(fleet.collector_api()).ok()?;
        merge = (counter(&status, "collector_merge_resolved"), counter(&status, "collector_merge_deduplicated"));
        let edges: Vec<_> = graph.edges.iter().filter(|edge| edge.port == 5432).collect();
        let merged = edges.len() == 1 && edges[0].source == "web" && edges[0].destination == "db";
        (merged && edges[0].connections == 3 && merge == (1, 1)).then_some(())
    });
    merged.unwrap_or_else(|| {
        panic!(
            "the collector never merged web -> db into one edge (resolved, deduplicated: {merge:?}): {graph:#?}\n{}",
            fleet.logs()
        )
    });

    assert_eq!(graph.edges.len(), 1, "{:#?}", graph.edges);
    let edge = &graph.edges[0];
    assert_eq!(edge.source, "web");
    assert_eq!(edge.destination, "db");
    assert_eq!(edge.protocol, pb::Protocol::Tcp as i32);
    let external: Vec<&str> = graph
        .nodes
        .iter()
        .filter(|node| node.kind == pb::NodeKind::External as i32)
        .map(|node| node.id.as_str())
        .collect();
    assert!(external.is_empty(), "external nodes left in the merged graph: {external:?}");

    // Each agent alone records only its end, so the client's agent has an edge to db's address.
    let web_graph = stream::graph(fleet.agents["web"].api_addr()).unwrap();
    let web_edge = web_graph.edges.iter().find(|edge| edge.port == 5432).unwrap();
    assert_eq!(web_edge.destination, format!("external:{DB_V4}"));
    let status = stream::status(fleet.collector_api()).unwrap();
    assert_eq!(counter(&status, "collector_merge_resolved"), 1);
    assert_eq!(counter(&status, "collector_merge_deduplicated"), 1);
}

#[test]
fn collector_restart_loses_and_duplicates_nothing() {
    let mut fleet = Fleet::start();
    let first_watch = DeviationWatcher::subscribe(fleet.collector_api()).unwrap();

    // Ten listeners before the collector dies, ten while it is down, ten after it returns.
    for port in 7001..=7010 {
        fleet.serve("ops", &["sink", "--listen", &format!("0.0.0.0:{port}")]);
    }
    wait_count(&fleet, &first_watch, 10, "ops new-listener deviations before the kill", |entry| {
        is_new_listener_on(entry, "ops-1")
    });
    let collector_pid = fleet.collector.pid().unwrap();
    fleet.collector.kill();
    let ended = wait_until(OBSERVE_TIMEOUT, || first_watch.ended());
    assert!(ended.is_some(), "the stream outlived collector pid {collector_pid}");
    let before: Vec<StreamEntry> = first_watch.entries();
    let resume_from = first_watch.last_sequence() + 1;

    for port in 7011..=7020 {
        fleet.serve("ops", &["sink", "--listen", &format!("0.0.0.0:{port}")]);
    }
    // The agent buffers them while the collector is down.
    let ops_api = fleet.agents["ops"].api_addr();
    let buffered = wait_until(OBSERVE_TIMEOUT, || {
        let status = stream::status(ops_api).ok()?;
        (status.last_sequence >= 20 && counter(&status, "collector_connected") == 0).then_some(status)
    });
    buffered.unwrap_or_else(|| panic!("agent ops never raised 20 deviations while disconnected\n{}", fleet.logs()));

    fleet.collector.restart().unwrap();
    // A client resumes where its stream stopped.
    let resumed = DeviationWatcher::subscribe_with(
        fleet.collector_api(),
        pb::StreamDeviationsRequest { from_sequence: Some(resume_from), ..Default::default() },
    )
    .unwrap();
    for port in 7021..=7030 {
        fleet.serve("ops", &["sink", "--listen", &format!("0.0.0.0:{port}")]);
    }
    wait_count(&fleet, &resumed, 20, "ops new-listener deviations after the restart", |entry| {
        is_new_listener_on(entry, "ops-1")
    });
    let statuses = fleet.wait_all_acknowledged();

    // What the agents raised, each read from its own API.
    let mut raised = Vec::new();
    for (host, agent) in &fleet.agents {
        let status = &statuses[host];
        let watcher = DeviationWatcher::subscribe(agent.api_addr()).unwrap();
        let complete = wait_until(OBSERVE_TIMEOUT, || (watcher.last_sequence() >= status.last_sequence).then_some(()));
        assert!(complete.is_some(), "agent {host} did not replay up to {}", status.last_sequence);
        raised.extend(watcher.entries());
    }
    // Everything the collector streamed, across the restart.
    let collector_status = stream::status(fleet.collector_api()).unwrap();
    let done = wait_until(OBSERVE_TIMEOUT, || (resumed.last_sequence() >= collector_status.last_sequence).then_some(()));
    assert!(done.is_some(), "the resumed stream stopped short of {}", collector_status.last_sequence);
    let after = resumed.entries();
    let mut streamed = before.clone();
    streamed.extend(after.iter().cloned());

    assert_eq!(
        keyed(&streamed),
        keyed(&raised),
        "collector stream:\n{}\nagents:\n{}",
        describe_entries(&streamed),
        describe_entries(&raised)
    );
    let ops_listeners = streamed.iter().filter(|entry| is_new_listener_on(entry, "ops-1")).count();
    assert_eq!(ops_listeners, 30);
    assert_eq!(after.first().map(|entry| entry.sequence), Some(resume_from), "the resumed stream skipped sequences");
    let sequences: Vec<u64> = streamed.iter().map(|entry| entry.sequence).collect();
    let expected: Vec<u64> = (1..=collector_status.last_sequence).collect();
    assert_eq!(sequences, expected, "collector sequences are not contiguous across the restart");
    assert!(first_watch.losses().is_empty(), "{:?}", first_watch.losses());
    assert!(resumed.losses().is_empty(), "{:?}", resumed.losses());
    let ops_node = collector_status.nodes.iter().find(|node| node.name == "ops-1").unwrap();
    assert_eq!(ops_node.lost, 0);
    assert_eq!(ops_node.received, statuses["ops"].last_sequence);
}

#[test]
fn collector_stream_applies_allow_and_deny_filters() {
    let mut fleet = Fleet::start();
    let everything = DeviationWatcher::subscribe(fleet.collector_api()).unwrap();

    fleet.serve("ops", &["sink", "--listen", "0.0.0.0:7101"]);
    fleet.serve("ops", &["sink", "--listen", "0.0.0.0:7102"]);
    fleet.serve("web", &["sink", "--listen", "0.0.0.0:7201"]);
    fleet.run("ops", Command::new("/usr/bin/id"));
    fleet.run("web", Command::new("/usr/bin/id"));
    wait_count(&fleet, &everything, 5, "deviations from ops and web", |entry| {
        entry.deviation.category == Category::NewListener as i32
            || entry.deviation.category == Category::UnexpectedExecutable as i32
    });

    // (new listeners on ops-1 OR programs under /usr/bin) AND NOT anything on web-1
    let request = pb::StreamDeviationsRequest {
        allow: vec![
            pb::DeviationFilter {
                categories: vec![Category::NewListener as i32],
                nodes: vec!["ops-1".into()],
                ..Default::default()
            },
            pb::DeviationFilter { executables: vec!["/usr/bin/*".into()], ..Default::default() },
        ],
        deny: vec![pb::DeviationFilter { nodes: vec!["web-1".into()], ..Default::default() }],
        from_sequence: Some(0),
        ..Default::default()
    };
    let filtered = DeviationWatcher::subscribe_with(fleet.collector_api(), request).unwrap();
    // A last listener that passes the filter marks the end: whatever came before it has been sent.
    fleet.serve("ops", &["sink", "--listen", "0.0.0.0:7103"]);
    let marker = filtered
        .wait_for("the ops listener on 7103", OBSERVE_TIMEOUT, |deviation| deviation.port == Some(7103))
        .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.logs()));
    assert_eq!(marker.category, Category::NewListener as i32);

    let received: Vec<(String, i32, Option<u32>, String)> = filtered
        .entries()
        .into_iter()
        .filter(|entry| entry.deviation.port != Some(7103))
        .map(|entry| {
            let exe = entry
                .deviation
                .evidence
                .as_ref()
                .and_then(|evidence| evidence.process.as_ref())
                .map_or(String::new(), |process| process.exe.clone());
            (entry.node, entry.deviation.category, entry.deviation.port, exe)
        })
        .collect();
    let service = fs::canonicalize(&fleet.service).unwrap().display().to_string();
    let mut expected = vec![
        ("ops-1".to_string(), Category::NewListener as i32, Some(7101), service.clone()),
        ("ops-1".to_string(), Category::NewListener as i32, Some(7102), service),
        ("ops-1".to_string(), Category::UnexpectedExecutable as i32, None, "/usr/bin/id".to_string()),
    ];
    let mut received_sorted = received.clone();
    received_sorted.sort();
    expected.sort();
    assert_eq!(
        received_sorted,
        expected,
        "filtered stream:\n{}\nunfiltered:\n{}",
        describe_all(&filtered.deviations()),
        describe_all(&everything.deviations())
    );
}

/// Returns `(agent sequence, run id, deviation id)` of every deviation the collector journalled
/// for `node`, in journal order.
fn journalled(fleet: &Fleet, node: &str) -> Vec<(u64, u64, String)> {
    let path = fleet.collector.data_dir().join("journal.jsonl");
    let text = fs::read_to_string(&path).unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
    text.lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .filter(|record| record["kind"] == "entry" && record["node"] == node)
        .map(|record| {
            let id = record["item"]["deviation"]["id"].as_str().unwrap_or_else(|| panic!("not a deviation: {record}"));
            (record["agent_sequence"].as_u64().unwrap(), record["run_id"].as_u64().unwrap(), id.to_string())
        })
        .collect()
}

#[test]
fn duplicate_node_is_rejected_until_first_stops() {
    let mut fleet = Fleet::start();
    for port in 7301..=7303 {
        fleet.serve("ops", &["sink", "--listen", &format!("0.0.0.0:{port}")]);
    }
    let ops_api = fleet.agents["ops"].api_addr();
    let raised = wait_until(OBSERVE_TIMEOUT, || (stream::status(ops_api).ok()?.last_sequence >= 3).then_some(()));
    raised.unwrap_or_else(|| panic!("agent ops never raised its 3 new listeners\n{}", fleet.logs()));

    // A second agent with the same --node scoped to the same cgroup, so it observes the same listeners.
    let bin = driftwatch_bin().unwrap();
    let collector_addr = fleet.collector_api().to_string();
    let args = ["--collector", collector_addr.as_str(), "--node", "ops-1", "--advertise-address", OPS_V4, "--snapshot-interval", "0.2"];
    let second = AgentUnderTest::start_with(&bin, fleet._model.path(), fleet.cgroups["ops"].path(), &args).unwrap();
    let rejected = wait_until(OBSERVE_TIMEOUT, || {
        let status = stream::status(second.api_addr()).ok()?;
        (counter(&status, "collector_node_conflicts") >= 2).then_some(status)
    });
    let second_status = rejected
        .unwrap_or_else(|| panic!("the second ops-1 agent was never rejected twice\n{}\nsecond agent log:\n{}", fleet.logs(), second.log()));
    assert_eq!(counter(&second_status, "collector_connected"), 0);
    assert_eq!(counter(&second_status, "collector_acknowledged_sequence"), 0);
    assert!(
        second.log().contains("give each agent a unique --node"),
        "the second agent did not log why it was rejected:\n{}",
        second.log()
    );

    // Both agents see these; only the first one's reach the collector.
    for port in 7304..=7306 {
        fleet.serve("ops", &["sink", "--listen", &format!("0.0.0.0:{port}")]);
    }
    // The second agent found 7301..=7303 already listening when it started, so it raises only these.
    let second_raised = wait_until(OBSERVE_TIMEOUT, || (stream::status(second.api_addr()).ok()?.last_sequence >= 3).then_some(()));
    second_raised.unwrap_or_else(|| panic!("the second ops-1 agent never raised 3 new listeners\n{}", second.log()));
    let first_status = fleet.wait_all_acknowledged().remove("ops").unwrap();
    let first_last = first_status.last_sequence;
    assert!(first_last >= 6, "{first_status:?}");

    let collector_status = stream::status(fleet.collector_api()).unwrap();
    let node = collector_status.nodes.iter().find(|node| node.name == "ops-1").unwrap();
    assert_eq!(node.received, first_last);
    assert_eq!(node.duplicates, 0);
    assert_eq!(node.lost, 0);
    assert!(node.connected);
    assert!(counter(&collector_status, "collector_streams_rejected") >= 2, "{collector_status:?}");

    // The collector's stream and journal hold each deviation of the first agent exactly once.
    let first_entries = DeviationWatcher::subscribe(ops_api).unwrap();
    let replayed = wait_until(OBSERVE_TIMEOUT, || (first_entries.last_sequence() >= first_last).then_some(()));
    assert!(replayed.is_some(), "agent ops did not replay up to {first_last}");
    let collector_entries = DeviationWatcher::subscribe(fleet.collector_api()).unwrap();
    let replayed = wait_until(OBSERVE_TIMEOUT, || (collector_entries.last_sequence() >= collector_status.last_sequence).then_some(()));
    assert!(replayed.is_some(), "the collector did not replay up to {}", collector_status.last_sequence);
    let from_ops: Vec<StreamEntry> = collector_entries.entries().into_iter().filter(|entry| entry.node == "ops-1").collect();
    let mut raised_by_first = first_entries.entries();
    for entry in &mut raised_by_first {
        entry.node = "ops-1".to_string();
    }
    assert_eq!(
        keyed(&from_ops),
        keyed(&raised_by_first),
        "collector:\n{}\nfirst agent:\n{}",
        describe_entries(&from_ops),
        describe_entries(&raised_by_first)
    );
    let journal = journalled(&fleet, "ops-1");
    let sequences: Vec<u64> = journal.iter().map(|(sequence, _, _)| *sequence).collect();
    assert_eq!(sequences, (1..=first_last).collect::<Vec<u64>>(), "{journal:#?}");
    let runs: std::collections::BTreeSet<u64> = journal.iter().map(|(_, run, _)| *run).collect();
    assert_eq!(runs.len(), 1, "deviations of more than one run journalled: {journal:#?}");

    // Once the first agent stops, the second takes the node over and pushes its own buffer.
    let mut first = fleet.agents.remove("ops").unwrap();
    let first_pid = first.pid();
    first.stop();
    let took_over = wait_until(OBSERVE_TIMEOUT, || {
        let status = stream::status(second.api_addr()).ok()?;
        let acknowledged = counter(&status, "collector_acknowledged_sequence");
        (counter(&status, "collector_connected") == 1 && acknowledged == status.last_sequence).then_some(status)
    });
    let second_status = took_over.unwrap_or_else(|| {
        panic!("the second ops-1 agent never took over after pid {first_pid} stopped\n{}\nsecond agent log:\n{}", fleet.logs(), second.log())
    });
    let collector_status = stream::status(fleet.collector_api()).unwrap();
    let node = collector_status.nodes.iter().find(|node| node.name == "ops-1").unwrap();
    assert!(node.connected);
    assert_eq!(node.acknowledged_sequence, second_status.last_sequence);
    assert_eq!(node.received, first_last + second_status.last_sequence);
    assert_eq!(node.duplicates, 0);
    let journal = journalled(&fleet, "ops-1");
    assert_eq!(journal.len() as u64, first_last + second_status.last_sequence, "{journal:#?}");
}
