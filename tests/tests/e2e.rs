//! End-to-end tests: real processes in network namespaces and cgroups, the real agent with its
//! eBPF programs, and assertions on the deviations it streams over gRPC.
//!
//! They need root and `DRIFTWATCH_BIN` (set by `cargo xtask test`). The harness tests at the end
//! need only root. Tests that start an agent run one at a time: each loads the eBPF programs, and
//! on a small machine parallel loads only make every deadline tighter.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use driftwatch_e2e::stream::{self, describe_all, process_of};
use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, spawn_in, unique_suffix, wait_until,
    AgentUnderTest, Cgroup, DeviationWatcher, ProcessGuard, Topology,
};
use driftwatch_proto::v1::{Category, Deviation};

/// How long the agent may take to turn a kernel event into a deviation or a graph edge.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a short client run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

const WEB_V4: &str = "198.18.2.10";
const DB_V4: &str = "198.18.4.10";
const EXT_V4: &str = "198.19.0.10";
const EXT_V6: &str = "fd00:d5:9::10";

/// Declares web (dmz) and db (core) selected by cgroup, and the flows internet -> web -> db.
/// `{ROOT}` becomes the test's cgroup.
const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: dmz, trust: 40 }
  - { id: core, trust: 80 }
components:
  - id: web
    zone: dmz
    exposed: true
    match: { cgroup: ["{ROOT}/web"] }
    listens: [{ port: 8080 }]
    executables: ["**/driftwatch-demo-service"]
  - id: db
    zone: core
    criticality: high
    match: { cgroup: ["{ROOT}/db"] }
    listens: [{ port: 5432 }]
    executables: ["**/driftwatch-demo-service"]
flows:
  - { from: internet, to: web, port: 8080 }
  - { from: web, to: db, port: 5432 }
exceptions: []
"#;

static AGENT_TESTS: Mutex<()> = Mutex::new(());

/// One test's world: the hosts client, web, db and ext, the cgroups web and db, the agent scoped
/// to their parent, web and db serving, and a subscription to every deviation.
/// Fields drop in declaration order, so processes end before the agent, cgroups and namespaces.
struct World {
    watcher: DeviationWatcher,
    processes: Vec<ProcessGuard>,
    agent: AgentUnderTest,
    web: Cgroup,
    db: Cgroup,
    root: Cgroup,
    topology: Topology,
    service: PathBuf,
    _model: tempfile::NamedTempFile,
    _serial: MutexGuard<'static, ()>,
}

impl World {
    fn start() -> World {
        World::start_with_agent_args(&[])
    }

    /// Like [`World::start`], with `agent_args` appended to the agent's command line.
    fn start_with_agent_args(agent_args: &[&str]) -> World {
        let serial = AGENT_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let bin = driftwatch_bin().unwrap();
        let service = demo_service_bin().unwrap();

        let mut topology = Topology::new().unwrap();
        topology
            .add_host("client", "198.18.1.10/24", "fd00:d5:1::10/64")
            .unwrap();
        topology
            .add_host("web", &format!("{WEB_V4}/24"), "fd00:d5:2::10/64")
            .unwrap();
        topology
            .add_host("db", &format!("{DB_V4}/24"), "fd00:d5:4::10/64")
            .unwrap();
        topology
            .add_host("ext", &format!("{EXT_V4}/24"), &format!("{EXT_V6}/64"))
            .unwrap();

        let root = Cgroup::create(&format!("dw-e2e-{}", unique_suffix())).unwrap();
        let web = root.child("web").unwrap();
        let db = root.child("db").unwrap();

        let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        fs::write(model.path(), MODEL.replace("{ROOT}", root.relative_path())).unwrap();
        let agent = AgentUnderTest::start_with(&bin, model.path(), root.path(), agent_args).unwrap();
        let watcher = DeviationWatcher::subscribe(agent.api_addr()).unwrap();

        let mut world = World {
            watcher,
            processes: Vec::new(),
            agent,
            web,
            db,
            root,
            topology,
            service,
            _model: model,
            _serial: serial,
        };
        world.serve("db", Some("db"), &["db", "--listen", "0.0.0.0:5432"]);
        world.serve(
            "web",
            Some("web"),
            &[
                "web",
                "--listen",
                "0.0.0.0:8080",
                "--upstream",
                &format!("{DB_V4}:5432"),
            ],
        );
        // The undeclared host replies like a db on both address families ([::] takes IPv4 too).
        world.serve("ext", None, &["db", "--listen", "[::]:9999"]);
        world
    }

    fn cgroup(&self, name: Option<&str>) -> Option<&Cgroup> {
        match name {
            Some("web") => Some(&self.web),
            Some("db") => Some(&self.db),
            Some(other) => panic!("no cgroup {other:?} in the test world"),
            None => None,
        }
    }

    fn service_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.service);
        command.args(args);
        command
    }

    /// Starts a listening service on `host`, in cgroup `cgroup`, and waits until it listens.
    fn serve(&mut self, host: &str, cgroup: Option<&str>, args: &[&str]) -> u32 {
        let process = self.spawn(host, cgroup, self.service_command(args));
        process
            .wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening"))
            .unwrap();
        let pid = process.pid();
        self.processes.push(process);
        pid
    }

    fn spawn(&self, host: &str, cgroup: Option<&str>, command: Command) -> ProcessGuard {
        spawn_in(
            Some(&self.topology.host(host).netns),
            self.cgroup(cgroup),
            command,
        )
        .unwrap()
    }

    /// Runs the demo service with `args` on `host` in `cgroup` until it succeeds; returns its pid.
    fn run(&self, host: &str, cgroup: Option<&str>, args: &[&str]) -> u32 {
        let mut process = self.spawn(host, cgroup, self.service_command(args));
        process.wait_success(RUN_TIMEOUT).unwrap();
        process.pid()
    }

    fn api(&self) -> SocketAddr {
        self.agent.api_addr()
    }

    fn wait_for(&self, what: &str, accept: impl Fn(&Deviation) -> bool) -> Deviation {
        self.watcher
            .wait_for(what, OBSERVE_TIMEOUT, accept)
            .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", self.agent.log()))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.processes.clear();
        // A failed assertion can leave children of the services behind; only the cgroup still lists them.
        let _ = self.root.kill_remaining();
    }
}

fn is(deviation: &Deviation, category: Category) -> bool {
    deviation.category == category as i32
}

fn remote_addr(deviation: &Deviation) -> &str {
    deviation
        .evidence
        .as_ref()
        .map_or("", |evidence| evidence.remote_addr.as_str())
}

fn local_addr(deviation: &Deviation) -> &str {
    deviation
        .evidence
        .as_ref()
        .map_or("", |evidence| evidence.local_addr.as_str())
}

#[test]
fn declared_flows_raise_no_deviation() {
    let world = World::start();

    world.run(
        "client",
        None,
        &[
            "client",
            "--target",
            &format!("{WEB_V4}:8080"),
            "--requests",
            "5",
        ],
    );

    // The edges appearing in the graph show the agent has processed the traffic.
    let mut graph = Default::default();
    let seen = wait_until(OBSERVE_TIMEOUT, || {
        graph = stream::graph(world.api()).ok()?;
        let web = graph
            .edges
            .iter()
            .find(|edge| edge.destination == "web" && edge.port == 8080)?;
        let db = graph
            .edges
            .iter()
            .find(|edge| edge.destination == "db" && edge.port == 5432)?;
        (web.connections >= 5 && db.connections >= 5).then(|| (web.clone(), db.clone()))
    });
    let (web_edge, db_edge) = seen
        .unwrap_or_else(|| panic!("graph never showed 5 connections to web and db: {graph:#?}"));
    assert_eq!(web_edge.source, "internet");
    assert!(
        web_edge.declared,
        "internet -> web is declared: {web_edge:?}"
    );
    assert_eq!(db_edge.source, "web");
    assert!(db_edge.declared, "web -> db is declared: {db_edge:?}");

    let raised = world.watcher.deviations();
    assert!(
        raised.is_empty(),
        "declared traffic raised deviations:\n{}",
        describe_all(&raised)
    );
    let status = stream::status(world.api()).unwrap();
    assert_eq!(
        status.last_sequence, 0,
        "the agent raised deviations nobody streamed"
    );
}

#[test]
fn undeclared_connect_raises_unexpected_flow() {
    let world = World::start();

    let pid = world.run(
        "web",
        Some("web"),
        &[
            "client",
            "--target",
            &format!("{EXT_V4}:9999"),
            "--requests",
            "1",
        ],
    );

    let found = world.wait_for("unexpected-flow from the client's pid", |d| {
        is(d, Category::UnexpectedFlow) && process_of(d).is_some_and(|(p, _)| p == pid)
    });
    let (_, exe) = process_of(&found).unwrap();
    assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
    assert_eq!(found.source, "web");
    assert_eq!(found.port, Some(9999));
    assert_eq!(remote_addr(&found), format!("{EXT_V4}:9999"));
    let local: SocketAddr = local_addr(&found)
        .parse()
        .unwrap_or_else(|_| panic!("local addr {:?}", local_addr(&found)));
    assert_eq!(local.ip().to_string(), WEB_V4);
    assert_ne!(local.port(), 0);
}

#[test]
fn undeclared_program_raises_unexpected_executable() {
    let world = World::start();

    let mut process = world.spawn("web", Some("web"), Command::new("/usr/bin/id"));
    process.wait_success(RUN_TIMEOUT).unwrap();
    let pid = process.pid();

    let found = world.wait_for("unexpected-executable for /usr/bin/id", |d| {
        is(d, Category::UnexpectedExecutable) && process_of(d).is_some_and(|(p, _)| p == pid)
    });
    assert_eq!(process_of(&found).unwrap().1, "/usr/bin/id");
    assert_eq!(found.source, "web");
}

#[test]
fn undeclared_listener_raises_new_listener() {
    let mut world = World::start();

    let pid = world.serve("web", Some("web"), &["sink", "--listen", "0.0.0.0:4444"]);

    let found = world.wait_for("new-listener on 4444", |d| {
        is(d, Category::NewListener) && d.port == Some(4444)
    });
    assert_eq!(found.source, "web");
    assert_eq!(process_of(&found).map(|(p, _)| p), Some(pid));
    assert_eq!(local_addr(&found), "0.0.0.0:4444");
}

#[test]
fn short_lived_process_is_attributed() {
    let world = World::start();

    // connect-once exits right after the handshake, long before the agent could read /proc.
    let pid = world.run(
        "web",
        Some("web"),
        &["connect-once", "--target", &format!("{EXT_V4}:9999")],
    );

    let found = world.wait_for("unexpected-flow from the connect-once pid", |d| {
        is(d, Category::UnexpectedFlow) && process_of(d).is_some_and(|(p, _)| p == pid)
    });
    let (_, exe) = process_of(&found).unwrap();
    assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
    assert_eq!(found.source, "web");
    assert_eq!(remote_addr(&found), format!("{EXT_V4}:9999"));
}

#[test]
fn ipv6_flow_is_attributed() {
    let world = World::start();

    let pid = world.run(
        "web",
        Some("web"),
        &[
            "client",
            "--target",
            &format!("[{EXT_V6}]:9999"),
            "--requests",
            "1",
        ],
    );

    let found = world.wait_for("unexpected-flow over IPv6 from the client's pid", |d| {
        is(d, Category::UnexpectedFlow) && process_of(d).is_some_and(|(p, _)| p == pid)
    });
    assert_eq!(found.source, "web");
    assert_eq!(found.port, Some(9999));
    assert_eq!(remote_addr(&found), format!("[{EXT_V6}]:9999"));
    assert!(
        local_addr(&found).starts_with("[fd00:d5:2::10]:"),
        "local {}",
        local_addr(&found)
    );
}

/// A model whose component names a zone that does not exist: line 7, column 11 is `dmzz`.
const BAD_MODEL: &str = "version: 1
zones:
  - { id: internet, trust: 0 }
  - { id: dmz, trust: 40 }
components:
  - id: web
    zone: dmzz
flows: []
";

#[test]
fn connect_then_exec_names_the_connecting_program() {
    let world = World::start();

    // The shell connects, then replaces itself with another program within the join window.
    let mut shell = Command::new("/bin/bash");
    shell.args(["-c", &format!("exec 3<>/dev/tcp/{EXT_V4}/9999; exec /bin/sleep 0.3")]);
    let mut process = world.spawn("web", Some("web"), shell);
    process.wait_success(RUN_TIMEOUT).unwrap();
    let pid = process.pid();

    let found = world.wait_for("unexpected-flow from the shell", |d| {
        is(d, Category::UnexpectedFlow) && process_of(d).is_some_and(|(p, _)| p == pid)
    });
    let (_, exe) = process_of(&found).unwrap();
    assert!(exe.ends_with("/bash"), "the flow is credited to {exe}, not to the shell that connected");
}

/// Returns the value of a status counter, 0 when the agent does not report it.
fn counter(world: &World, name: &str) -> u64 {
    let status = stream::status(world.api()).unwrap();
    status.counters.iter().find(|counter| counter.name == name).map_or(0, |counter| counter.value)
}

/// Runs `program` in the web tier and returns its pid once it exited successfully.
fn run_in_web(world: &World, program: &str) -> u32 {
    let mut process = world.spawn("web", Some("web"), Command::new(program));
    process.wait_success(RUN_TIMEOUT).unwrap();
    process.pid()
}

#[test]
fn sighup_reloads_model_and_rejects_invalid() {
    let world = World::start();
    let root = world.root.relative_path().to_string();
    let hangup = |world: &World| {
        // SAFETY: kill has no memory preconditions; the pid is the agent this test started.
        assert_eq!(unsafe { libc::kill(world.agent.pid() as i32, libc::SIGHUP) }, 0);
    };

    // An invalid model is rejected and the one in force stays: /usr/bin/id is still undeclared.
    fs::write(world._model.path(), "version: 1\ncomponents: [{ id: web, zone: nowhere }]\n").unwrap();
    hangup(&world);
    let first = run_in_web(&world, "/usr/bin/id");
    world.wait_for("unexpected-executable for id under the old model", |d| {
        is(d, Category::UnexpectedExecutable) && process_of(d).is_some_and(|(p, _)| p == first)
    });
    assert_eq!(counter(&world, "engine_model_reloads"), 0);

    // A valid model that lists /usr/bin/id is put in force without a restart.
    let declared = MODEL
        .replace("{ROOT}", &root)
        .replace(r#"executables: ["**/driftwatch-demo-service"]"#, r#"executables: ["**/driftwatch-demo-service", "/usr/bin/id"]"#);
    fs::write(world._model.path(), declared).unwrap();
    hangup(&world);
    assert!(
        wait_until(OBSERVE_TIMEOUT, || (counter(&world, "engine_model_reloads") == 1).then_some(())).is_some(),
        "the agent did not reload the model:\n{}",
        world.agent.log()
    );
    let second = run_in_web(&world, "/usr/bin/id");
    // A program the new model does not list marks the point by which the id exec was judged.
    let marker = run_in_web(&world, "/usr/bin/whoami");
    world.wait_for("unexpected-executable for whoami", |d| {
        is(d, Category::UnexpectedExecutable) && process_of(d).is_some_and(|(p, _)| p == marker)
    });
    let raised_for_second = world
        .watcher
        .deviations()
        .iter()
        .any(|d| process_of(d).is_some_and(|(p, _)| p == second));
    assert!(!raised_for_second, "id is declared after the reload, yet it raised:\n{}", describe_all(&world.watcher.deviations()));
}

#[test]
fn accepts_reported_after_other_family_listener_closes() {
    let mut world = World::start();

    // Two listeners on one port in the web tier, IPv4 and IPv6; the IPv6 one closes first.
    let v4 = world.serve("web", Some("web"), &["sink", "--listen", &format!("{WEB_V4}:7070")]);
    let mut v6 = world.spawn(
        "web",
        Some("web"),
        world.service_command(&["sink", "--listen", "[fd00:d5:2::10]:7070", "--lifetime", "1"]),
    );
    v6.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
    v6.wait_success(RUN_TIMEOUT).unwrap();

    // The accept on the IPv4 listener must still reach the agent.
    world.run("client", None, &["connect-once", "--target", &format!("{WEB_V4}:7070")]);
    let found = world.wait_for("unexpected-flow to the IPv4 listener on 7070", |d| {
        is(d, Category::UnexpectedFlow) && d.port == Some(7070)
    });
    assert_eq!(found.destination, "web");
    let server_pid = found
        .evidence
        .as_ref()
        .and_then(|evidence| evidence.peer_process.as_ref().or(evidence.process.as_ref()))
        .map(|process| process.pid);
    assert_eq!(server_pid, Some(v4), "{}", describe_all(&world.watcher.deviations()));
}

#[test]
fn lost_records_raise_telemetry_gap() {
    // One page of ring buffer fits a handful of exec records, so an exec storm overflows it.
    let world = World::start_with_agent_args(&["--ring-buffer-kib", "4"]);

    let mut storm = Command::new("/bin/bash");
    storm.args(["-c", "for i in $(seq 2000); do /bin/true; done"]);
    world.spawn("web", Some("web"), storm).wait_success(RUN_TIMEOUT * 3).unwrap();

    let gap = world.wait_for("telemetry-gap after the exec storm", |d| is(d, Category::TelemetryGap));
    assert_eq!(gap.id, "telemetry-gap@agent@kernel");
    assert!(gap.count > 0, "a gap reports how many records were lost");
    let status = stream::status(world.api()).unwrap();
    let lost: u64 = status
        .counters
        .iter()
        .filter(|counter| counter.name.starts_with("kernel_drops_") && !counter.name.contains("_cpu"))
        .map(|counter| counter.value)
        .sum();
    assert!(lost > 0, "status shows the kernel drops: {:?}", status.counters);
}

#[test]
fn malformed_model_is_rejected_with_location() {
    let bin = driftwatch_bin().unwrap();
    let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    fs::write(model.path(), BAD_MODEL).unwrap();
    let location = format!("{}:7:11", model.path().display());

    let validate = Command::new(&bin)
        .args(["model", "validate"])
        .arg(model.path())
        .output()
        .unwrap();
    let validate_stderr = String::from_utf8_lossy(&validate.stderr);
    assert!(
        !validate.status.success(),
        "validate accepted a bad model; stderr:\n{validate_stderr}"
    );
    assert!(
        validate_stderr.contains(&location),
        "validate did not name {location}; stderr:\n{validate_stderr}"
    );
    assert!(
        validate_stderr.contains("dmzz"),
        "validate did not name the bad zone; stderr:\n{validate_stderr}"
    );

    let ready = tempfile::tempdir().unwrap();
    let agent = Command::new(&bin)
        .arg("agent")
        .arg("--model")
        .arg(model.path())
        .args(["--api", "127.0.0.1:0", "--ready-file"])
        .arg(ready.path().join("ready"))
        .output()
        .unwrap();
    let agent_stderr = String::from_utf8_lossy(&agent.stderr);
    assert!(
        !agent.status.success(),
        "the agent started on a bad model; stderr:\n{agent_stderr}"
    );
    assert!(
        agent_stderr.contains(&location),
        "the agent did not name {location}; stderr:\n{agent_stderr}"
    );
    assert!(
        !ready.path().join("ready").exists(),
        "the agent wrote its ready file on a bad model"
    );
}

// The harness itself: namespaces, routing, cgroups and cleanup. These need root but no agent.

#[test]
fn topology_routes_ipv4_and_ipv6_between_subnets() {
    require_root().unwrap();
    let service = demo_service_bin().unwrap();
    let mut topology = Topology::new().unwrap();
    topology
        .add_host("a", "198.18.1.10/24", "fd00:d5:1::10/64")
        .unwrap();
    topology
        .add_host("b", "198.18.4.10/24", "fd00:d5:4::10/64")
        .unwrap();

    let mut db = Command::new(&service);
    db.args(["db", "--listen", "[::]:5432"]);
    let db = spawn_in(Some(&topology.host("b").netns), None, db).unwrap();
    db.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening"))
        .unwrap();

    for target in ["198.18.4.10:5432", "[fd00:d5:4::10]:5432"] {
        let mut client = Command::new(&service);
        client.args(["client", "--target", target, "--requests", "3"]);
        let mut client = spawn_in(Some(&topology.host("a").netns), None, client).unwrap();
        let output = client.wait_success(RUN_TIMEOUT).unwrap();
        assert_eq!(output, ["client: 3/3 answers correct"], "to {target}");
    }
}

#[test]
fn spawn_in_enters_cgroup_and_namespace_before_exec() {
    require_root().unwrap();
    let mut topology = Topology::new().unwrap();
    topology
        .add_host("a", "198.18.1.10/24", "fd00:d5:1::10/64")
        .unwrap();
    let cgroup = Cgroup::create(&format!("dw-e2e-{}", unique_suffix())).unwrap();
    let netns = &topology.host("a").netns;

    let mut cat = Command::new("/bin/cat");
    cat.args(["/proc/self/cgroup"]);
    let mut cat = spawn_in(Some(netns), Some(&cgroup), cat).unwrap();
    let pid = cat.pid();
    let lines = cat.wait_success(RUN_TIMEOUT).unwrap();

    assert!(
        lines.contains(&format!("0::{}", cgroup.relative_path())),
        "pid {pid} was not in {}: {lines:?}",
        cgroup.relative_path()
    );
    let mut readlink = Command::new("/usr/bin/readlink");
    readlink.arg("/proc/self/ns/net");
    let mut readlink = spawn_in(Some(netns), None, readlink).unwrap();
    let link = readlink.wait_success(RUN_TIMEOUT).unwrap();
    let inode = fs::metadata(netns.path()).unwrap().ino();
    assert_eq!(link, [format!("net:[{inode}]")]);
}

#[test]
fn harness_removes_namespaces_and_cgroups_on_drop() {
    require_root().unwrap();
    let mut topology = Topology::new().unwrap();
    topology
        .add_host("a", "198.18.1.10/24", "fd00:d5:1::10/64")
        .unwrap();
    let cgroup = Cgroup::create(&format!("dw-e2e-{}", unique_suffix())).unwrap();
    let child = cgroup.child("web").unwrap();
    let router = topology.router().path();
    let host = topology.host("a").netns.path();
    let cgroup_dir = cgroup.path().to_path_buf();

    let mut sleep = Command::new("/bin/sleep");
    sleep.arg("600");
    let sleeper = spawn_in(Some(&topology.host("a").netns), Some(&child), sleep).unwrap();
    assert_eq!(cgroup.pids().unwrap(), [sleeper.pid()]);

    drop(sleeper);
    drop(child);
    drop(cgroup);
    drop(topology);

    assert!(
        !cgroup_dir.exists(),
        "{} is still there",
        cgroup_dir.display()
    );
    assert!(!router.exists(), "{} is still there", router.display());
    assert!(!host.exists(), "{} is still there", host.display());
}
