//! Accepted connections attributed to the process that accepts them, asserted on the agent's
//! gRPC stream: prefork workers sharing one listening socket, two SO_REUSEPORT listeners on one
//! port, a listening socket handed to another process over a Unix socket, and servers that
//! accept through io_uring, one of them on a socket handed to it. A process that renames itself with `prctl(PR_SET_NAME)` is still
//! identified by its executable path.
//!
//! Every server replies to a connection with the pid of the process that accepted it, so each test
//! can tell exactly which process the agent must name. Servers and clients run in a network
//! namespace of the test's own and talk over its loopback; the clients stay outside the agent's
//! scope, so each flow reaches the engine with its server end only.
//!
//! They need root and `DRIFTWATCH_BIN` (set by `cargo xtask test`).

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use driftwatch_e2e::{
    require_root, spawn_in, unique_suffix, wait_until, AgentUnderTest, Cgroup,
    DeviationWatcher, NetNs, ProcessGuard,
};
use driftwatch_proto::v1::{Category, Deviation, Evidence, ProcessInfo};

/// How long the agent may take to turn a kernel event into a deviation.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may take to listen, or a client to finish.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

const PROBE: &str = env!("CARGO_BIN_EXE_driftwatch-accept-probe");

/// Components selected by cgroup, then two selected by executable path: a decoy that a process
/// renamed to `sshd` must not match, and the probe's own path. `{ROOT}` becomes the test's cgroup.
const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: inside, trust: 50 }
components:
  - { id: prefork, zone: inside, match: { cgroup: ["{ROOT}/prefork"] } }
  - { id: reuse-a, zone: inside, match: { cgroup: ["{ROOT}/reuse-a"] } }
  - { id: reuse-b, zone: inside, match: { cgroup: ["{ROOT}/reuse-b"] } }
  - { id: passer, zone: inside, match: { cgroup: ["{ROOT}/passer"] } }
  - { id: receiver, zone: inside, match: { cgroup: ["{ROOT}/receiver"] } }
  - { id: seeded, zone: inside, match: { cgroup: ["{ROOT}/seeded"] } }
  - { id: uring, zone: inside, match: { cgroup: ["{ROOT}/uring"] } }
  - { id: scripted, zone: inside, match: { cgroup: ["{ROOT}/scripted"] }, executables: ["/bin/true"] }
  - { id: decoy, zone: inside, match: { exe: ["**/sshd"] } }
  - { id: probe, zone: inside, match: { exe: ["**/driftwatch-accept-probe"] } }
flows: []
exceptions: []
"#;

const CGROUPS: [&str; 9] = ["prefork", "reuse-a", "reuse-b", "passer", "receiver", "seeded", "scripted", "renamed", "uring"];

static AGENT_TESTS: Mutex<()> = Mutex::new(());

/// One connection as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    /// The pid the server wrote back: the process that accepted the connection.
    pid: u32,
    client: SocketAddr,
    server: SocketAddr,
}

/// A test's namespace, cgroups, agent and subscription. Fields drop in declaration order, so
/// processes end before the agent, the cgroups and the namespace.
struct World {
    watcher: Option<DeviationWatcher>,
    processes: Vec<ProcessGuard>,
    agent: Option<AgentUnderTest>,
    cgroups: Vec<(String, Cgroup)>,
    root: Cgroup,
    netns: NetNs,
    model: tempfile::NamedTempFile,
    _serial: MutexGuard<'static, ()>,
}

impl World {
    /// Creates the namespace, the cgroups and the model, then starts the agent.
    fn start() -> World {
        let mut world = World::prepare();
        world.start_agent();
        world
    }

    /// Creates the namespace, the cgroups and the model; the agent starts with
    /// [`World::start_agent`].
    fn prepare() -> World {
        let serial = AGENT_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let suffix = unique_suffix();
        let netns = NetNs::create(&format!("dwhD{suffix}")).unwrap();
        let root = Cgroup::create(&format!("dw-hD-accept-{suffix}")).unwrap();
        let cgroups = CGROUPS
            .iter()
            .map(|name| (name.to_string(), root.child(name).unwrap()))
            .collect();
        let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        fs::write(model.path(), MODEL.replace("{ROOT}", root.relative_path())).unwrap();
        World {
            watcher: None,
            processes: Vec::new(),
            agent: None,
            cgroups,
            root,
            netns,
            model,
            _serial: serial,
        }
    }

    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Starts the agent with `extra_args` on its command line.
    fn start_agent_with(&mut self, extra_args: &[&str]) {
        let bin = driftwatch_e2e::driftwatch_bin().unwrap();
        let agent = AgentUnderTest::start_with(&bin, self.model.path(), self.root.path(), extra_args).unwrap();
        // The agent falls back to the tracepoint when the kernel refuses `sock_ops`; these tests
        // are about the program this kernel allows.
        let status = driftwatch_e2e::stream::status(agent.api_addr()).unwrap();
        assert!(
            status.hooks.iter().any(|hook| hook.name == "tcp_sock_ops" && hook.attached),
            "tcp_sock_ops is not attached: {:#?}",
            status.hooks
        );
        self.watcher = Some(DeviationWatcher::subscribe(agent.api_addr()).unwrap());
        self.agent = Some(agent);
    }

    fn watcher(&self) -> &DeviationWatcher {
        self.watcher.as_ref().expect("the agent runs")
    }

    fn cgroup(&self, name: &str) -> &Cgroup {
        let found = self.cgroups.iter().find(|(cgroup, _)| cgroup == name);
        &found.unwrap_or_else(|| panic!("no cgroup {name:?} in the test world")).1
    }

    /// Starts the probe with `args` in cgroup `cgroup` and waits for a stdout line starting with
    /// `ready_prefix`. Returns the process's index in `processes` and that line.
    fn start_probe(&mut self, cgroup: &str, args: &[&str], ready_prefix: &str) -> (usize, String) {
        let mut command = Command::new(PROBE);
        command.args(args);
        let process = spawn_in(Some(&self.netns), Some(self.cgroup(cgroup)), command).unwrap();
        let line = process
            .wait_for_line(RUN_TIMEOUT, |line| line.starts_with(ready_prefix))
            .unwrap();
        self.processes.push(process);
        (self.processes.len() - 1, line)
    }

    /// Starts a listening probe and returns its pid and listening address.
    fn listen(&mut self, cgroup: &str, args: &[&str]) -> (u32, SocketAddr) {
        let (index, line) = self.start_probe(cgroup, args, "listening ");
        let addr = line["listening ".len()..].parse().unwrap();
        (self.processes[index].pid(), addr)
    }

    /// Starts a probe in `mode` in cgroup `receiver`, then one in `passer` that listens and sends
    /// it the listening socket over a Unix socket. Returns the receiver's pid, the sender's and
    /// the listening address, once the sender has closed its copy.
    fn pass_listener(&mut self, mode: &str) -> (u32, u32, SocketAddr) {
        let socket_dir = tempfile::tempdir().unwrap();
        let path = socket_dir.path().join("listener.sock");
        let path = path.to_str().unwrap();
        let (receiver_index, _) = self.start_probe("receiver", &[mode, path], "ready");
        let (sender, addr) = self.listen("passer", &["pass-listener", path]);
        self.processes[receiver_index]
            .wait_for_line(RUN_TIMEOUT, |line| line.starts_with("received "))
            .unwrap();
        self.processes.last().unwrap().wait_for_line(RUN_TIMEOUT, |line| line == "passed").unwrap();
        (self.processes[receiver_index].pid(), sender, addr)
    }

    /// Starts a listening probe outside the agent's scope and returns it with its listening
    /// address.
    fn listen_outside(&self, args: &[&str]) -> (ProcessGuard, SocketAddr) {
        let mut command = Command::new(PROBE);
        command.args(args);
        let process = spawn_in(Some(&self.netns), None, command).unwrap();
        let line = process.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening ")).unwrap();
        (process, line["listening ".len()..].parse().unwrap())
    }

    /// Connects once from outside the agent's scope and returns who served the connection.
    fn connect(&self, server: SocketAddr) -> Served {
        let mut command = Command::new(PROBE);
        command.args(["connect", &server.to_string()]);
        let mut client = spawn_in(Some(&self.netns), None, command).unwrap();
        let lines = client.wait_success(RUN_TIMEOUT).unwrap();
        parse_served(lines.iter().find(|line| line.starts_with("served ")).unwrap())
    }

    /// Connects from outside the agent's scope and keeps the connection open while the returned
    /// client runs.
    fn hold(&self, server: SocketAddr) -> (ProcessGuard, Served) {
        let mut command = Command::new(PROBE);
        command.args(["hold", &server.to_string()]);
        let client = spawn_in(Some(&self.netns), None, command).unwrap();
        let line = client.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("served ")).unwrap();
        (client, parse_served(&line))
    }

    /// Waits for the unexpected-flow deviation into `component` on `port`.
    fn wait_for_flow(&self, component: &str, port: u16) -> Deviation {
        let id = format!("unexpected-flow@internet@{component}@tcp/{port}");
        self.wait_for(&id, |deviation| deviation.id == id)
    }

    /// Returns the connections counted on the graph's edge into `component` on `port`.
    fn edge_connections(&self, component: &str, port: u16) -> Option<u64> {
        let api = self.agent.as_ref().expect("the agent runs").api_addr();
        let graph = driftwatch_e2e::stream::graph(api).ok()?;
        let port = u32::from(port);
        graph.edges.iter().find(|edge| edge.destination == component && edge.port == port).map(|edge| edge.connections)
    }

    /// Waits until the edge into `component` on `port` counts `expected` connections, then checks
    /// that it still does 3 s later: counts are read once a second and held for the join, and
    /// none may come twice.
    fn assert_edge_settles_at(&self, component: &str, port: u16, expected: u64) {
        let counted = wait_until(OBSERVE_TIMEOUT, || {
            self.edge_connections(component, port).filter(|&connections| connections >= expected)
        });
        assert_eq!(counted, Some(expected), "the edge did not reach {expected} connections");
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(self.edge_connections(component, port), Some(expected));
    }

    /// Returns the agent's status counter `name`, 0 when it is not listed.
    fn counter(&self, name: &str) -> u64 {
        let api = self.agent.as_ref().expect("the agent runs").api_addr();
        let status = driftwatch_e2e::stream::status(api).unwrap();
        status.counters.iter().find(|counter| counter.name == name).map_or(0, |counter| counter.value)
    }

    fn wait_for(&self, what: &str, accept: impl Fn(&Deviation) -> bool) -> Deviation {
        let agent = self.agent.as_ref().expect("the agent runs");
        self.watcher()
            .wait_for(what, OBSERVE_TIMEOUT, accept)
            .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", agent.log()))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.processes.clear();
        // Prefork workers die with their parent, but a failed assertion can leave others behind.
        for (_, cgroup) in &self.cgroups {
            let _ = cgroup.kill_remaining();
        }
        let _ = self.root.kill_remaining();
    }
}

/// Parses `served <pid> <client addr> <server addr>`.
fn parse_served(line: &str) -> Served {
    let fields: Vec<&str> = line.split_whitespace().collect();
    Served {
        pid: fields[1].parse().unwrap(),
        client: fields[2].parse().unwrap(),
        server: fields[3].parse().unwrap(),
    }
}

fn evidence(deviation: &Deviation) -> &Evidence {
    deviation.evidence.as_ref().expect("a flow deviation has evidence")
}

fn process(deviation: &Deviation) -> &ProcessInfo {
    evidence(deviation).process.as_ref().expect("the accepting process is in the evidence")
}

/// Asserts the evidence names the process `pid` with parent `ppid`, running the probe, on the
/// connection `served`.
fn assert_accepted_by(deviation: &Deviation, served: &Served, pid: u32, ppid: u32) {
    let process = process(deviation);
    assert_eq!(process.pid, pid, "accepting pid in {deviation:#?}");
    assert_eq!(process.namespace_pid, Some(pid), "pid in the host's pid namespace");
    assert_eq!(process.ppid, ppid, "parent of the accepting process in {deviation:#?}");
    assert_eq!(process.exe, PROBE, "executable in {deviation:#?}");
    assert_eq!(evidence(deviation).local_addr, served.client.to_string(), "client end");
    assert_eq!(evidence(deviation).remote_addr, served.server.to_string(), "server end");
    assert_eq!(evidence(deviation).peer_process, None, "the client is outside the scope");
}

#[test]
fn prefork_worker_is_named_not_listener_owner() {
    let mut world = World::start();
    let (parent, addr) = world.listen("prefork", &["prefork", "3"]);
    let server = world.processes.last().unwrap();
    let workers: BTreeSet<u32> = wait_until(RUN_TIMEOUT, || {
        let workers: BTreeSet<u32> = server
            .stdout_lines()
            .iter()
            .filter_map(|line| line.strip_prefix("worker "))
            .map(|pid| pid.parse().unwrap())
            .collect();
        (workers.len() == 3).then_some(workers)
    })
    .unwrap_or_else(|| panic!("the prefork server did not start 3 workers: {:?}", server.stdout_lines()));

    let served = world.connect(addr);
    assert!(workers.contains(&served.pid), "served by {} and not by a worker of {workers:?}", served.pid);
    assert_ne!(served.pid, parent);
    let deviation = world.wait_for_flow("prefork", addr.port());
    assert_accepted_by(&deviation, &served, served.pid, parent);
}

#[test]
fn acceptor_outside_scope_not_charged() {
    let mut world = World::start();
    let (_, addr) = world.listen("prefork", &["prefork", "1"]);
    let server = world.processes.last().unwrap();
    let worker: u32 = wait_until(RUN_TIMEOUT, || {
        server.stdout_lines().iter().find_map(|line| line.strip_prefix("worker ")?.parse().ok())
    })
    .unwrap_or_else(|| panic!("the prefork server started no worker: {:?}", server.stdout_lines()));
    // The worker leaves the scope for the cgroup above it; the listener's owner stays.
    let outside = world.root.path().parent().unwrap().join("cgroup.procs");
    fs::write(&outside, worker.to_string()).unwrap();

    let served = world.connect(addr);
    assert_eq!(served.pid, worker);
    // A connection to a listener in scope afterwards raises its deviation. The worker's raises
    // none, also once its 250 ms wait for an acceptor is over.
    let (_, inside) = world.listen("reuse-a", &["reuseport", "0"]);
    world.connect(inside);
    world.wait_for_flow("reuse-a", inside.port());
    std::thread::sleep(Duration::from_secs(1));
    let raised = world.watcher().deviations();
    let charged: Vec<&Deviation> = raised
        .iter()
        .filter(|deviation| deviation.port == Some(u32::from(addr.port())))
        .filter(|deviation| deviation.category != Category::NewListener as i32)
        .collect();
    assert!(charged.is_empty(), "the connection accepted outside the scope was charged: {charged:#?}");
}

#[test]
fn reuseport_listeners_each_name_themselves() {
    let mut world = World::start();
    let (first, addr) = world.listen("reuse-a", &["reuseport", "0"]);
    let (second, second_addr) = world.listen("reuse-b", &["reuseport", &addr.port().to_string()]);
    assert_eq!(second_addr, addr);

    // The kernel picks the listener by a hash of the client's address and port, so new
    // connections reach both sooner or later.
    let mut first_served = None;
    let mut second_served = None;
    for _ in 0..64 {
        let served = world.connect(addr);
        match served.pid {
            pid if pid == first => first_served = first_served.or(Some(served)),
            pid if pid == second => second_served = second_served.or(Some(served)),
            other => panic!("served by pid {other}, neither listener ({first}, {second})"),
        }
        if first_served.is_some() && second_served.is_some() {
            break;
        }
    }
    let first_served = first_served.expect("64 connections never reached the first listener");
    let second_served = second_served.expect("64 connections never reached the second listener");

    let test_pid = std::process::id();
    let deviation = world.wait_for_flow("reuse-a", addr.port());
    assert_accepted_by(&deviation, &first_served, first, test_pid);
    let deviation = world.wait_for_flow("reuse-b", addr.port());
    assert_accepted_by(&deviation, &second_served, second, test_pid);
}

#[test]
fn repeated_connections_count_on_one_edge() {
    const REPEATS: u64 = 12;
    let mut world = World::start();
    let (server, addr) = world.listen("reuse-a", &["reuseport", "0"]);
    for _ in 0..REPEATS {
        assert_eq!(world.connect(addr).pid, server);
    }
    world.wait_for_flow("reuse-a", addr.port());

    // Each connection counts once on the edge, whether the kernel reported it or only counted it.
    world.assert_edge_settles_at("reuse-a", addr.port(), REPEATS);
    let folded = world.counter("folds_connections");
    assert!((1..REPEATS).contains(&folded), "{folded} of {REPEATS} connections were folded");
}

#[test]
fn io_uring_worker_accepts_name_the_process() {
    const REPEATS: u64 = 12;
    let mut world = World::start();
    let (server, addr) = world.listen("uring", &["uring-listen"]);

    // No accept system call returns the connection: the completion of the accept, which an io-wq
    // worker thread of the server ran, names the process.
    let first = world.connect(addr);
    assert_eq!(first.pid, server);
    let deviation = world.wait_for_flow("uring", addr.port());
    assert_accepted_by(&deviation, &first, server, std::process::id());

    // The repeats fold on the accepting end, where no accept program runs for them either.
    for _ in 1..REPEATS {
        assert_eq!(world.connect(addr).pid, server);
    }
    world.assert_edge_settles_at("uring", addr.port(), REPEATS);
    let folded = world.counter("folds_connections");
    assert!((1..REPEATS).contains(&folded), "{folded} of {REPEATS} connections were folded");
}

#[test]
fn listener_passed_over_unix_socket_names_receiver() {
    let mut world = World::start();
    let (receiver, sender, addr) = world.pass_listener("receive-listener");

    let served = world.connect(addr);
    assert_eq!(served.pid, receiver, "the sender ({sender}) closed its copy of the socket");
    let deviation = world.wait_for_flow("receiver", addr.port());
    assert_accepted_by(&deviation, &served, receiver, std::process::id());
    let passer = world.watcher().deviations().into_iter().find(|deviation| deviation.id.contains("@passer@tcp/"));
    assert_eq!(passer, None, "no flow may be attributed to the process that only listened");
}

#[test]
fn io_uring_accept_of_passed_listener_names_receiver() {
    let mut world = World::start();
    let (receiver, sender, addr) = world.pass_listener("uring-receive-listener");

    // One multishot accept takes both connections. The second comes in a later fold epoch, so it
    // is reported in full and needs the accept's second completion to name its process. Without
    // that completion, the agent would name the listener's owner, the sender.
    let first = world.connect(addr);
    assert_eq!(first.pid, receiver, "the sender ({sender}) closed its copy of the socket");
    let deviation = world.wait_for_flow("receiver", addr.port());
    assert_accepted_by(&deviation, &first, receiver, std::process::id());
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(world.connect(addr).pid, receiver);
    world.assert_edge_settles_at("receiver", addr.port(), 2);
    let passer = world.watcher().deviations().into_iter().find(|deviation| deviation.id.contains("@passer@tcp/"));
    assert_eq!(passer, None, "no flow may be attributed to the process that only listened");
}

#[test]
fn io_uring_accepts_turned_off_name_listener_owner() {
    let mut world = World::prepare();
    world.start_agent_with(&["--no-io-uring-accepts"]);
    let api = world.agent.as_ref().expect("the agent runs").api_addr();
    let hooks = driftwatch_e2e::stream::status(api).unwrap().hooks;
    for name in ["io_uring_submit_req", "io_uring_complete"] {
        let hook = hooks.iter().find(|hook| hook.name == name).unwrap_or_else(|| panic!("no hook {name}: {hooks:#?}"));
        assert!(!hook.attached, "{hook:#?}");
        assert!(hook.error.contains("--no-io-uring-accepts"), "{hook:#?}");
    }

    // Without the programs, the connection goes to the listener's owner after the wait for an
    // accept record: here the sender, which passed the socket on.
    let (receiver, sender, addr) = world.pass_listener("uring-receive-listener");
    let served = world.connect(addr);
    assert_eq!(served.pid, receiver);
    let deviation = world.wait_for_flow("passer", addr.port());
    assert_eq!(process(&deviation).pid, sender, "{deviation:#?}");
}

#[test]
fn renamed_process_is_identified_by_executable() {
    let mut world = World::start();
    let (pid, addr) = world.listen("renamed", &["renamed-listen", "sshd"]);
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "sshd", "the probe renamed itself");

    let deviation = world.wait_for(&format!("new-listener of pid {pid}"), |deviation| {
        deviation.category == Category::NewListener as i32
            && deviation.evidence.as_ref().and_then(|evidence| evidence.process.as_ref()).map(|process| process.pid) == Some(pid)
    });
    assert_eq!(deviation.source, "probe", "component by executable path, not the sshd decoy: {}", deviation.id);
    assert!(deviation.id.starts_with("new-listener@probe@"), "{}", deviation.id);
    let process = process(&deviation);
    assert_eq!(process.exe, PROBE);
    assert_eq!(process.ppid, std::process::id());
    assert_eq!(evidence(&deviation).local_addr, addr.to_string());
    // A process of the host's pid namespace has the same pid there, and no unit or container.
    assert_eq!(process.namespace_pid, Some(pid));
    assert_eq!(process.pid_namespace_level, 0);
    assert_eq!(process.systemd_unit, None);
    assert_eq!(process.container_id, "");
    assert_eq!(process.pod_uid, "");
    assert!(!process.fileless);
    assert!(!process.exe_deleted);
}

#[test]
fn script_names_its_interpreter_on_stream() {
    let mut world = World::start();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("job.sh");
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.to_str().unwrap().to_string();

    let mut process = spawn_in(Some(&world.netns), Some(world.cgroup("scripted")), Command::new(&script)).unwrap();
    process.wait_success(RUN_TIMEOUT).unwrap();
    let pid = process.pid();
    world.processes.push(process);

    let deviation = world.wait_for(&format!("unexpected-executable for {script}"), |deviation| {
        deviation.category == Category::UnexpectedExecutable as i32
            && deviation.evidence.as_ref().and_then(|evidence| evidence.process.as_ref()).map(|process| process.pid) == Some(pid)
    });
    let process = self::process(&deviation);
    assert_eq!(process.exe, script);
    assert_eq!(process.interpreter.as_deref(), Some("/bin/sh"));
    assert_eq!(process.ppid, std::process::id());
    assert!(!process.fileless);
    assert!(!process.from_descriptor);
    assert!(deviation.summary.contains(&format!("{script} (pid {pid}, run by /bin/sh)")), "{}", deviation.summary);
}

#[test]
fn v6only_listener_not_charged_ipv4() {
    let mut world = World::start();
    // Outside the scope, an IPv4 wildcard listener; then, in scope, an IPv6-only wildcard one on
    // the same port. Both are wildcards, of different families.
    let (outside, outside_addr) = world.listen_outside(&["listen", "0.0.0.0:0"]);
    let port = outside_addr.port();
    let (inside_pid, inside) = world.listen("reuse-a", &["listen-v6only", &port.to_string()]);

    let served_outside = world.connect(SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(served_outside.pid, outside.pid());
    std::thread::sleep(Duration::from_millis(500));
    let served_inside = world.connect(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, inside.port())));
    assert_eq!(served_inside.pid, inside_pid);
    let deviation = world.wait_for_flow("reuse-a", port);
    assert_accepted_by(&deviation, &served_inside, inside_pid, std::process::id());
}

#[test]
fn outside_listener_shadows_wildcard_in_scope() {
    let mut world = World::start();
    // In scope, a wildcard listener; outside it, one on a specific address of the same port.
    // SO_REUSEPORT on both lets the two share the port.
    let (inside_pid, inside) = world.listen("reuse-a", &["reuseport-on", "0.0.0.0:0"]);
    let (outside, outside_addr) = world.listen_outside(&["reuseport-on", &format!("127.0.0.2:{}", inside.port())]);

    let served = world.connect(outside_addr);
    assert_eq!(served.pid, outside.pid());
    std::thread::sleep(Duration::from_millis(500));
    let loopback = SocketAddr::from(([127, 0, 0, 1], inside.port()));
    let served_inside = world.connect(loopback);
    assert_eq!(served_inside.pid, inside_pid);
    let deviation = world.wait_for_flow("reuse-a", inside.port());
    assert_accepted_by(&deviation, &served_inside, inside_pid, std::process::id());
    std::thread::sleep(Duration::from_secs(1));
    let raised = world.watcher().deviations();
    let charged: Vec<&Deviation> = raised
        .iter()
        .filter(|deviation| deviation.evidence.as_ref().is_some_and(|evidence| evidence.remote_addr == outside_addr.to_string()))
        .collect();
    assert!(charged.is_empty(), "the connection to {outside_addr} was charged to the wildcard listener in scope: {charged:#?}");
}

#[test]
fn closed_seeded_listener_keeps_no_port() {
    let mut world = World::prepare();
    let (_, addr) = world.listen("seeded", &["reuseport", "0"]);
    world.start_agent();

    // The listener opened before the agent closes, which `sock_ops` does not report, and a
    // process outside the scope listens on its port.
    drop(world.processes.pop());
    let mut command = Command::new(PROBE);
    command.args(["reuseport", &addr.port().to_string()]);
    let outside = spawn_in(Some(&world.netns), None, command).unwrap();
    outside.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening ")).unwrap();
    let served = world.connect(addr);
    assert_eq!(served.pid, outside.pid());

    // A connection to a listener in scope afterwards raises its deviation. The earlier one,
    // accepted by no process in scope, would wait for an acceptor for at most 250 ms more.
    let (_, inside) = world.listen("reuse-a", &["reuseport", "0"]);
    world.connect(inside);
    world.wait_for_flow("reuse-a", inside.port());
    std::thread::sleep(Duration::from_secs(1));
    let raised = world.watcher().deviations();
    // The seeded listener raised new-listener at start-up; nothing else may name its port.
    let stale: Vec<&Deviation> = raised
        .iter()
        .filter(|deviation| deviation.port == Some(u32::from(addr.port())))
        .filter(|deviation| deviation.category != Category::NewListener as i32)
        .collect();
    assert!(stale.is_empty(), "the closed listener's component was charged: {stale:#?}");
}

#[test]
fn listener_other_address_not_charged() {
    let mut world = World::start();
    // Outside the scope, a listener on a second loopback address; then one in scope on the same
    // port of the first.
    let (outside, outside_addr) = world.listen_outside(&["listen", "127.0.0.2:0"]);
    let (inside_pid, inside) = world.listen("reuse-a", &["listen", &format!("127.0.0.1:{}", outside_addr.port())]);

    let served_outside = world.connect(outside_addr);
    assert_eq!(served_outside.pid, outside.pid());
    // Let a wrongly attributed connection raise its deviation before the one in scope does.
    std::thread::sleep(Duration::from_millis(500));
    let served_inside = world.connect(inside);
    assert_eq!(served_inside.pid, inside_pid);
    let deviation = world.wait_for_flow("reuse-a", inside.port());
    assert_accepted_by(&deviation, &served_inside, inside_pid, std::process::id());
    std::thread::sleep(Duration::from_secs(1));
    let raised = world.watcher().deviations();
    let charged: Vec<&Deviation> = raised
        .iter()
        .filter(|deviation| deviation.port == Some(u32::from(inside.port())))
        .filter(|deviation| evidence(deviation).remote_addr == outside_addr.to_string())
        .collect();
    assert!(charged.is_empty(), "the connection to {outside_addr} was charged to the listener in scope: {charged:#?}");
}

#[test]
fn closed_seeded_listener_leaves_wildcard_port() {
    let mut world = World::prepare();
    let (_, addr) = world.listen("seeded", &["reuseport", "0"]);
    world.start_agent();

    // The listener opened before the agent closes, and a process outside the scope listens on
    // the wildcard address of its port, which leaves the closed listener's kernel entry for
    // 127.0.0.1 in place. The agent reads /proc once a second to find such a close.
    drop(world.processes.pop());
    let (outside, _) = world.listen_outside(&["listen", &format!("0.0.0.0:{}", addr.port())]);
    std::thread::sleep(Duration::from_millis(2500));
    let served = world.connect(addr);
    assert_eq!(served.pid, outside.pid());

    let (_, inside) = world.listen("reuse-a", &["reuseport", "0"]);
    world.connect(inside);
    world.wait_for_flow("reuse-a", inside.port());
    std::thread::sleep(Duration::from_secs(1));
    let raised = world.watcher().deviations();
    let stale: Vec<&Deviation> = raised
        .iter()
        .filter(|deviation| deviation.port == Some(u32::from(addr.port())))
        .filter(|deviation| deviation.category != Category::NewListener as i32)
        .collect();
    assert!(stale.is_empty(), "the closed listener's component was charged: {stale:#?}");
}

#[test]
fn connection_opened_before_agent_is_seeded() {
    let mut world = World::prepare();
    let (server, addr) = world.listen("seeded", &["reuseport", "0"]);
    let (_client, served) = world.hold(addr);
    assert_eq!(served.pid, server);

    world.start_agent();
    let deviation = world.wait_for_flow("seeded", addr.port());
    assert_accepted_by(&deviation, &served, server, std::process::id());
}
