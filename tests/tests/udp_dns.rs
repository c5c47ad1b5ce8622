//! UDP flows, DNS names and io_uring on real kernel events: a client process in a network
//! namespace of its own sends datagrams (with `sendto`, on a connected socket, over IPv6 and to
//! an IPv4-mapped address), resolves a name at a DNS server written here and connects to the
//! answer, and connects or sends through io_uring. Every test asserts the process, executable,
//! addresses and DNS name the agent streams over gRPC. A UDP server in scope replies to clients
//! outside it, and its replies must count as flows to its own port.
//!
//! They need root, `DRIFTWATCH_BIN` and `DRIFTWATCH_DEMO_BIN` (set by `cargo xtask test`).
//! Namespaces and cgroups carry the tag `hC`, or `hK` in the UDP reply tests.

use std::collections::BTreeSet;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use driftwatch_e2e::stream::{self, describe_all, process_of};
use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, spawn_in, unique_suffix, wait_until,
    AgentUnderTest, Cgroup, DeviationWatcher, NetNs, ProcessGuard, Topology,
};
use driftwatch_proto::v1::{Category, Deviation, Protocol};

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

const CLIENT_V4: &str = "198.18.1.10";
const CLIENT_V6: &str = "fd00:d5:1::10";
const SERVER_V4: &str = "198.18.2.10";
const SERVER_V6: &str = "fd00:d5:2::10";
const DNS_V4: &str = "198.18.3.53";

/// Declares one component, `client`, selected by cgroup, and one UDP flow to port 7001.
const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: lab, trust: 50 }
components:
  - id: client
    zone: lab
    match: { cgroup: ["{ROOT}/client"] }
    executables: ["**/driftwatch-demo-service"]
flows:
  - { from: client, to: internet, port: 7001, proto: udp }
exceptions: []
"#;

/// Declares one component, `resolver`, selected by cgroup, which serves UDP on port 53; `{FLOWS}`
/// is the list of declared flows. The clients outside the agent's scope are in zone `internet`.
const REPLY_MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: lab, trust: 50 }
components:
  - id: resolver
    zone: lab
    match: { cgroup: ["{ROOT}/resolver"] }
    executables: ["**/driftwatch-demo-service"]
flows: {FLOWS}
exceptions: []
"#;

/// Declares the components `client` and `resolver` in one zone, with a UDP listener on port
/// 7010 and no flow. The zone `internet` covers loopback too.
const LOCAL_MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: lab, trust: 50 }
components:
  - id: client
    zone: lab
    match: { cgroup: ["{ROOT}/client"] }
    executables: ["**/driftwatch-demo-service"]
  - id: resolver
    zone: lab
    match: { cgroup: ["{ROOT}/resolver"] }
    executables: ["**/driftwatch-demo-service"]
    listens: [{ port: 7010, proto: udp }]
flows: []
exceptions: []
"#;

/// The resolver's selector line in [`REPLY_MODEL`], after which a test adds its `listens`.
const RESOLVER_MATCH: &str = "    match: { cgroup: [\"{ROOT}/resolver\"] }\n";

/// Queries the UDP reply tests send, each from a socket of its own and so from its own port.
const QUERIES: usize = 5;

static AGENT_TESTS: Mutex<()> = Mutex::new(());

/// One test's world: hosts client, server and dns, the cgroups `client` and `resolver`, the
/// agent scoped to their parent, and a subscription to every deviation. Fields drop in
/// declaration order.
struct World {
    watcher: DeviationWatcher,
    processes: Vec<ProcessGuard>,
    agent: AgentUnderTest,
    client: Cgroup,
    resolver: Cgroup,
    root: Cgroup,
    topology: Topology,
    service: PathBuf,
    _model: tempfile::NamedTempFile,
    _serial: MutexGuard<'static, ()>,
}

/// What a test may use to start processes before the agent starts.
struct Before<'a> {
    topology: &'a Topology,
    resolver: &'a Cgroup,
    service: &'a PathBuf,
}

impl Before<'_> {
    /// Starts the demo service with `args` on the server host in the resolver's cgroup and waits
    /// until it listens.
    fn serve(&self, args: &[&str]) -> ProcessGuard {
        let mut command = Command::new(self.service);
        command.args(args);
        let process = spawn_in(Some(&self.topology.host("server").netns), Some(self.resolver), command).unwrap();
        process.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
        process
    }
}

impl World {
    fn start() -> World {
        World::start_with("hC", MODEL)
    }

    /// Starts a world whose namespaces and cgroups carry `tag`, with the agent on `model`, in
    /// which `{ROOT}` stands for the agent's cgroup.
    fn start_with(tag: &str, model_text: &str) -> World {
        World::start_after(tag, model_text, |_| Vec::new())
    }

    /// Starts a world like [`World::start_with`], where `before` starts processes before the
    /// agent, given the topology, the resolver's cgroup and the demo service.
    fn start_after(tag: &str, model_text: &str, before: impl FnOnce(Before) -> Vec<ProcessGuard>) -> World {
        let serial = AGENT_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let bin = driftwatch_bin().unwrap();
        let service = demo_service_bin().unwrap();

        let mut topology = Topology::tagged(tag).unwrap();
        topology.add_host("client", &format!("{CLIENT_V4}/24"), &format!("{CLIENT_V6}/64")).unwrap();
        topology.add_host("server", &format!("{SERVER_V4}/24"), &format!("{SERVER_V6}/64")).unwrap();
        topology.add_host("dns", &format!("{DNS_V4}/24"), "fd00:d5:3::53/64").unwrap();

        let root = Cgroup::create(&format!("dw-udp-{tag}-{}", unique_suffix())).unwrap();
        let client = root.child("client").unwrap();
        let resolver = root.child("resolver").unwrap();
        let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        fs::write(model.path(), model_text.replace("{ROOT}", root.relative_path())).unwrap();
        let processes = before(Before { topology: &topology, resolver: &resolver, service: &service });
        let agent = AgentUnderTest::start_with(&bin, model.path(), root.path(), &[]).unwrap();
        let watcher = DeviationWatcher::subscribe(agent.api_addr()).unwrap();
        World {
            watcher,
            processes,
            agent,
            client,
            resolver,
            root,
            topology,
            service,
            _model: model,
            _serial: serial,
        }
    }

    /// Runs the demo service with `args` on the client host, in the observed cgroup, until it
    /// succeeds; returns its pid and its stdout.
    fn run_client(&self, args: &[&str]) -> (u32, Vec<String>) {
        self.run_client_on("client", args)
    }

    /// Runs the demo service with `args` on `host`, in the observed cgroup `client`, until it
    /// succeeds; returns its pid and its stdout.
    fn run_client_on(&self, host: &str, args: &[&str]) -> (u32, Vec<String>) {
        let mut command = Command::new(&self.service);
        command.args(args);
        let mut process =
            spawn_in(Some(&self.topology.host(host).netns), Some(&self.client), command).unwrap();
        let output = process
            .wait_success(RUN_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", self.agent.log()));
        (process.pid(), output)
    }

    /// Starts a TCP listener on the server host, outside the observed cgroup.
    fn serve_tcp(&mut self, port: u16) {
        let mut command = Command::new(&self.service);
        command.args(["sink", "--listen", &format!("[::]:{port}")]);
        let process = spawn_in(Some(&self.topology.host("server").netns), None, command).unwrap();
        process.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
        self.processes.push(process);
    }

    /// Starts a UDP echo server on `listen` on the server host, in the observed cgroup
    /// `resolver`, and returns its pid.
    fn serve_udp_in_scope(&mut self, listen: &str) -> u32 {
        self.start_udp_server("udp-echo", listen)
    }

    /// Starts the demo service's `role` (a UDP server) on `listen` on the server host, in the
    /// observed cgroup `resolver`, and returns its pid.
    fn start_udp_server(&mut self, role: &str, listen: &str) -> u32 {
        let mut command = Command::new(&self.service);
        command.args([role, "--listen", listen]);
        let process =
            spawn_in(Some(&self.topology.host("server").netns), Some(&self.resolver), command).unwrap();
        process.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
        let pid = process.pid();
        self.processes.push(process);
        pid
    }

    /// Waits until the graph has a UDP edge on `port` with `connections` connections, then
    /// checks that it is the only UDP edge and returns it.
    fn only_udp_edge(&self, port: u32, connections: u64) -> driftwatch_proto::v1::Edge {
        let mut graph = Default::default();
        let edge = wait_until(OBSERVE_TIMEOUT, || {
            graph = stream::graph(self.agent.api_addr()).ok()?;
            graph.edges.iter().find(|edge| edge.port == port && edge.connections == connections).cloned()
        })
        .unwrap_or_else(|| panic!("no UDP edge on port {port} with {connections} connections in {graph:#?}"));
        let udp_edges: Vec<_> = graph.edges.iter().filter(|edge| edge.protocol == Protocol::Udp as i32).collect();
        assert_eq!(udp_edges.len(), 1, "expected one UDP edge: {udp_edges:#?}");
        edge
    }

    fn client_netns(&self) -> u32 {
        netns_inode(&self.topology.host("client").netns)
    }

    /// Waits until the agent's status shows counter `name` at `expected` (the pipeline publishes
    /// its counters once a second), and fails with every counter when it does not get there.
    fn assert_counter(&self, name: &str, expected: u64) {
        let mut counters = Vec::new();
        let reached = wait_until(OBSERVE_TIMEOUT, || {
            counters = stream::status(self.agent.api_addr()).ok()?.counters;
            let value = counters.iter().find(|counter| counter.name == name)?.value;
            (value == expected).then_some(())
        });
        let value = counters.iter().find(|counter| counter.name == name).map(|counter| counter.value);
        assert!(reached.is_some(), "counter {name} is {value:?}, expected {expected}; counters: {counters:?}");
    }

    fn wait_for(&self, what: &str, accept: impl Fn(&Deviation) -> bool) -> Deviation {
        self.watcher
            .wait_for(what, OBSERVE_TIMEOUT, accept)
            .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", self.agent.log()))
    }

    /// Waits for the unexpected-flow deviation on `protocol`/`port` and checks that the demo
    /// service with `pid` in the client's namespace caused it.
    fn wait_for_flow(&self, protocol: Protocol, port: u16, pid: u32) -> Deviation {
        let found = self.wait_for(&format!("unexpected-flow on port {port}"), |deviation| {
            deviation.category == Category::UnexpectedFlow as i32
                && deviation.protocol == protocol as i32
                && deviation.port == Some(u32::from(port))
        });
        let (found_pid, exe) = process_of(&found).unwrap_or_else(|| panic!("no process in {found:?}"));
        assert_eq!(found_pid, pid, "{}", describe_all(&[found.clone()]));
        assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
        assert_eq!(found.source, "client");
        assert_eq!(evidence(&found).netns, self.client_netns());
        found
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.processes.clear();
        let _ = self.root.kill_remaining();
    }
}

fn evidence(deviation: &Deviation) -> &driftwatch_proto::v1::Evidence {
    deviation.evidence.as_ref().expect("a flow deviation has evidence")
}

fn netns_inode(netns: &NetNs) -> u32 {
    fs::metadata(netns.path()).unwrap().ino() as u32
}

/// Returns the local address in a workload's output line "... from ADDR to ADDR".
fn local_from_output(output: &[String]) -> SocketAddr {
    let line = output.last().expect("the workload prints one line");
    let from = line.split(" from ").nth(1).and_then(|rest| rest.split(' ').next());
    from.and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no local address in {line:?}"))
}

#[test]
fn udp_sendto_raises_flow_with_exact_tuple() {
    let world = World::start();

    let (pid, output) = world.run_client(&[
        "udp-send", "--target", &format!("{SERVER_V4}:7000"), "--bind", &format!("{CLIENT_V4}:0"), "--count", "50",
    ]);

    let found = world.wait_for_flow(Protocol::Udp, 7000, pid);
    let local = local_from_output(&output);
    assert_eq!(local.ip().to_string(), CLIENT_V4);
    assert_eq!(evidence(&found).local_addr, local.to_string());
    assert_eq!(evidence(&found).remote_addr, format!("{SERVER_V4}:7000"));
    assert_eq!(found.id, "unexpected-flow@client@internet@udp/7000");

    // Fifty datagrams are one flow: the kernel reports only the first.
    world.assert_counter("pipeline_udp_flows", 1);
    // The client bound its socket to port 0, an ephemeral port, so it is no listener.
    world.assert_counter("pipeline_udp_binds", 0);
}

#[test]
fn cgroup_move_changes_component() {
    let model = MODEL.replace(
        "flows:\n",
        "  - id: resolver\n    zone: lab\n    match: { cgroup: [\"{ROOT}/resolver\"] }\n    executables: [\"**/driftwatch-demo-service\"]\nflows:\n",
    );
    let world = World::start_with("hV", &model);

    // Started in the client's cgroup, the process moves itself into the resolver's before it
    // sends: its exec named the client, its datagram the resolver.
    let resolver = world.resolver.path().display().to_string();
    let (pid, _) = world.run_client(&["udp-send", "--target", &format!("{SERVER_V4}:7002"), "--join-cgroup", &resolver]);

    let found = world.wait_for("unexpected-flow on udp/7002", |deviation| {
        deviation.category == Category::UnexpectedFlow as i32 && deviation.port == Some(7002)
    });
    assert_eq!(found.id, "unexpected-flow@resolver@internet@udp/7002");
    let (found_pid, _) = process_of(&found).unwrap_or_else(|| panic!("no process in {found:?}"));
    assert_eq!(found_pid, pid);
    let process = evidence(&found).process.as_ref().expect("a process");
    assert_eq!(process.cgroup, world.resolver.relative_path());
    assert_eq!(evidence(&found).netns, world.client_netns());
    world.assert_counter("processes_cgroup_moves", 1);
    // /proc shows the same process and program: the entry is kept, not read again.
    world.assert_counter("processes_read_from_proc", 0);
    world.assert_counter("processes_reused_pids", 0);
    let raised = world.watcher.deviations();
    assert!(
        raised.iter().all(|deviation| !deviation.id.contains("@client@")),
        "the flow was judged as the client's:\n{}",
        describe_all(&raised)
    );
}

#[test]
fn moved_server_keeps_its_entry() {
    let mut world = World::start_with("hZ", &REPLY_MODEL.replace("{FLOWS}", "[]"));

    // Started in the client's cgroup, where its exec is reported, the sink moves into the
    // resolver's and binds there while it runs: /proc then shows the same process and program.
    let resolver = world.resolver.path().display().to_string();
    let mut command = Command::new(&world.service);
    command.args(["udp-sink", "--listen", "0.0.0.0:525", "--join-cgroup", &resolver]);
    let process = spawn_in(Some(&world.topology.host("server").netns), Some(&world.client), command).unwrap();
    process.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
    let pid = process.pid();
    world.processes.push(process);

    let listener = world.wait_for("new-listener on udp/525", |deviation| {
        deviation.category == Category::NewListener as i32 && deviation.port == Some(525)
    });
    assert_eq!(listener.id, "new-listener@resolver@0.0.0.0@udp/525");
    assert_eq!(process_of(&listener).map(|(found, _)| found), Some(pid));
    world.assert_counter("processes_cgroup_moves", 1);
    world.assert_counter("processes_read_from_proc", 0);
    world.assert_counter("processes_reused_pids", 0);
}

#[test]
fn process_moved_into_scope_is_read() {
    // The resolver lists no program that runs here, so the sink's own program is judged too.
    let model = REPLY_MODEL
        .replace("{FLOWS}", "[]")
        .replace("executables: [\"**/driftwatch-demo-service\"]", "executables: [\"/usr/sbin/unbound\"]");
    let mut world = World::start_with("hW", &model);

    // Started outside the agent's scope, so its exec was never reported, the sink moves itself
    // into the resolver's cgroup and binds there: the agent reads it from /proc.
    let resolver = world.resolver.path().display().to_string();
    let mut command = Command::new(&world.service);
    command.args(["udp-sink", "--listen", "0.0.0.0:521", "--join-cgroup", &resolver]);
    let process = spawn_in(Some(&world.topology.host("server").netns), None, command).unwrap();
    process.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
    let pid = process.pid();
    world.processes.push(process);

    let listener = world.wait_for("new-listener on udp/521", |deviation| {
        deviation.category == Category::NewListener as i32 && deviation.port == Some(521)
    });
    assert_eq!(listener.id, "new-listener@resolver@0.0.0.0@udp/521");
    let (found_pid, exe) = process_of(&listener).unwrap_or_else(|| panic!("no process in {listener:?}"));
    assert_eq!(found_pid, pid);
    assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
    let judged = world.wait_for("unexpected-executable in resolver", |deviation| {
        deviation.category == Category::UnexpectedExecutable as i32
    });
    assert!(judged.id.starts_with("unexpected-executable@resolver@"), "{}", judged.id);
    assert!(judged.id.ends_with("/driftwatch-demo-service"), "{}", judged.id);
    assert_eq!(process_of(&judged).map(|(pid, _)| pid), Some(pid));
    world.assert_counter("processes_read_from_proc", 1);
    world.assert_counter("pipeline_listens_without_process", 0);
}

#[test]
fn socket_taken_out_of_scope_is_not_observed() {
    let mut world = World::start_with("hY", &REPLY_MODEL.replace("{FLOWS}", "[]"));
    let outside = Cgroup::create(&format!("dw-udp-out-{}", unique_suffix())).unwrap();

    // The socket is created in scope, then its process moves out and binds and sends with it.
    let script = format!(
        "import os, socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         open('{}/cgroup.procs', 'w').write(str(os.getpid()))\n\
         s.bind(('0.0.0.0', 523))\n\
         s.sendto(b'x', ('{SERVER_V4}', 7004))\n",
        outside.path().display()
    );
    let mut command = Command::new("python3");
    command.args(["-c", &script]);
    let mut process = spawn_in(Some(&world.topology.host("server").netns), Some(&world.resolver), command).unwrap();
    process.wait_success(RUN_TIMEOUT).unwrap();

    // A process in scope binds afterwards; once its listener is raised, the earlier records
    // would have been handled too.
    let pid = world.start_udp_server("udp-sink", "0.0.0.0:524");
    let listener = world.wait_for("new-listener on udp/524", |deviation| {
        deviation.category == Category::NewListener as i32 && deviation.port == Some(524)
    });
    assert_eq!(process_of(&listener).map(|(found, _)| found), Some(pid));
    world.assert_counter("pipeline_udp_binds", 1);
    world.assert_counter("pipeline_udp_flows", 0);
    let raised = world.watcher.deviations();
    let outside_ports: Vec<&Deviation> =
        raised.iter().filter(|deviation| matches!(deviation.port, Some(523) | Some(7004))).collect();
    assert!(outside_ports.is_empty(), "activity out of scope raised:\n{}", describe_all(&raised));
}

#[test]
fn listeners_before_agent_are_judged() {
    let world = World::start_after("hX", &REPLY_MODEL.replace("{FLOWS}", "[]"), |before| {
        vec![before.serve(&["udp-sink", "--listen", "0.0.0.0:522"]), before.serve(&["sink", "--listen", "0.0.0.0:8090"])]
    });
    let udp_pid = world.processes[0].pid();
    let tcp_pid = world.processes[1].pid();

    for (id, pid) in [("new-listener@resolver@0.0.0.0@udp/522", udp_pid), ("new-listener@resolver@0.0.0.0@tcp/8090", tcp_pid)] {
        let listener = world.wait_for(id, |deviation| deviation.id == id);
        let (found_pid, exe) = process_of(&listener).unwrap_or_else(|| panic!("no process in {listener:?}"));
        assert_eq!(found_pid, pid, "{id}");
        assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
        assert_eq!(evidence(&listener).netns, netns_inode(&world.topology.host("server").netns));
    }
    // Found in /proc, not reported by the kernel programs.
    world.assert_counter("pipeline_udp_binds", 0);
}

#[test]
fn udp_lite_is_observed_as_udp() {
    let world = World::start();

    // A UDP-Lite socket (IPPROTO_UDPLITE) in the client's cgroup binds a port and sends.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)\n\
         s.bind(('{CLIENT_V4}', 526))\n\
         s.sendto(b'x', ('{SERVER_V4}', 7005))\n"
    );
    let mut command = Command::new("python3");
    command.args(["-c", &script]);
    let mut process = spawn_in(Some(&world.topology.host("client").netns), Some(&world.client), command).unwrap();
    process.wait_success(RUN_TIMEOUT).unwrap();

    let found = world.wait_for("unexpected-flow on udp/7005", |deviation| {
        deviation.category == Category::UnexpectedFlow as i32 && deviation.port == Some(7005)
    });
    assert_eq!(found.id, "unexpected-flow@client@internet@udp/7005");
    assert_eq!(process_of(&found).map(|(pid, _)| pid), Some(process.pid()));
    assert_eq!(evidence(&found).local_addr, format!("{CLIENT_V4}:526"));
    let listener = world.wait_for("new-listener on udp/526", |deviation| {
        deviation.category == Category::NewListener as i32 && deviation.port == Some(526)
    });
    assert_eq!(listener.id, format!("new-listener@client@{CLIENT_V4}@udp/526"));
}

#[test]
fn declared_udp_flow_raises_nothing() {
    let world = World::start();

    world.run_client(&["udp-send", "--target", &format!("{SERVER_V4}:7001")]);

    let mut graph = Default::default();
    let edge = wait_until(OBSERVE_TIMEOUT, || {
        graph = stream::graph(world.agent.api_addr()).ok()?;
        graph.edges.iter().find(|edge| edge.port == 7001).cloned()
    })
    .unwrap_or_else(|| panic!("no UDP edge on port 7001 in {graph:#?}"));
    assert_eq!(edge.protocol, Protocol::Udp as i32);
    assert_eq!(edge.source, "client");
    assert_eq!(edge.destination, "internet");
    assert!(edge.declared, "{edge:?}");
    let raised = world.watcher.deviations();
    assert!(raised.is_empty(), "a declared UDP flow raised:\n{}", describe_all(&raised));
}

#[test]
fn connected_udp_raises_flow_with_exact_tuple() {
    let world = World::start();

    let (pid, output) = world.run_client(&[
        "udp-connect", "--target", &format!("{SERVER_V4}:7002"), "--bind", &format!("{CLIENT_V4}:0"), "--count", "3",
    ]);

    let found = world.wait_for_flow(Protocol::Udp, 7002, pid);
    assert_eq!(evidence(&found).local_addr, local_from_output(&output).to_string());
    assert_eq!(evidence(&found).remote_addr, format!("{SERVER_V4}:7002"));
}

#[test]
fn udp_over_ipv6_raises_flow() {
    let world = World::start();

    let (pid, output) = world.run_client(&[
        "udp-send", "--target", &format!("[{SERVER_V6}]:7003"), "--bind", &format!("[{CLIENT_V6}]:0"),
    ]);

    let found = world.wait_for_flow(Protocol::Udp, 7003, pid);
    let local = local_from_output(&output);
    assert_eq!(local.ip().to_string(), CLIENT_V6);
    assert_eq!(evidence(&found).local_addr, local.to_string());
    assert_eq!(evidence(&found).remote_addr, format!("[{SERVER_V6}]:7003"));
}

#[test]
fn udp_to_ipv4_mapped_address_shows_ipv4() {
    let world = World::start();

    let (pid, output) = world.run_client(&[
        "udp-send", "--target", &format!("[::ffff:{SERVER_V4}]:7004"), "--bind", "[::]:0",
    ]);

    let found = world.wait_for_flow(Protocol::Udp, 7004, pid);
    assert_eq!(evidence(&found).remote_addr, format!("{SERVER_V4}:7004"));
    let local: SocketAddr = evidence(&found).local_addr.parse().unwrap();
    assert_eq!(local.port(), local_from_output(&output).port());
    assert!(local.ip().is_unspecified(), "local {local}");
}

#[test]
fn io_uring_udp_send_is_attributed() {
    let world = World::start();

    let (pid, output) = world.run_client(&[
        "uring-udp", "--target", &format!("{SERVER_V4}:7005"), "--bind", &format!("{CLIENT_V4}:0"),
    ]);

    let found = world.wait_for_flow(Protocol::Udp, 7005, pid);
    assert_eq!(evidence(&found).local_addr, local_from_output(&output).to_string());
    assert_eq!(evidence(&found).remote_addr, format!("{SERVER_V4}:7005"));
}

#[test]
fn io_uring_tcp_connect_is_attributed() {
    let mut world = World::start();
    world.serve_tcp(9100);

    let (pid, _) = world.run_client(&["uring-connect", "--target", &format!("{SERVER_V4}:9100")]);

    let found = world.wait_for_flow(Protocol::Tcp, 9100, pid);
    assert_eq!(evidence(&found).remote_addr, format!("{SERVER_V4}:9100"));
    let local: SocketAddr = evidence(&found).local_addr.parse().unwrap();
    assert_eq!(local.ip().to_string(), CLIENT_V4);
    assert_ne!(local.port(), 0);
}

#[test]
fn resolved_name_appears_in_deviation() {
    let mut world = World::start();
    world.serve_tcp(9000);
    let server = DnsServer::start(
        &world.topology.host("dns").netns,
        SocketAddr::new(DNS_V4.parse().unwrap(), 53),
        vec![
            ("api.hc.test", Answer::Cname("edge.hc.test")),
            ("edge.hc.test", Answer::A(SERVER_V4.parse().unwrap())),
        ],
    );

    let (pid, output) = world.run_client(&[
        "resolve-connect", "--server", &format!("{DNS_V4}:53"), "--name", "api.hc.test", "--port", "9000",
    ]);
    assert!(output.iter().any(|line| line.contains(SERVER_V4)), "{output:?}");
    assert_eq!(server.stop(), 1, "the DNS server should have answered one query");

    let query = world.wait_for_flow(Protocol::Udp, 53, pid);
    assert_eq!(evidence(&query).remote_addr, format!("{DNS_V4}:53"));
    let connect = world.wait_for_flow(Protocol::Tcp, 9000, pid);
    assert_eq!(evidence(&connect).remote_addr, format!("{SERVER_V4}:9000"));
    assert_eq!(evidence(&connect).remote_name.as_deref(), Some("api.hc.test"));

    let mut graph = Default::default();
    let edge = wait_until(OBSERVE_TIMEOUT, || {
        graph = stream::graph(world.agent.api_addr()).ok()?;
        graph.edges.iter().find(|edge| edge.port == 9000).cloned()
    })
    .unwrap_or_else(|| panic!("no edge on port 9000 in {graph:#?}"));
    assert_eq!(edge.remote_names, ["api.hc.test"]);

    world.assert_counter("dns_messages", 1);
    world.assert_counter("dns_unmatched", 0);
    world.assert_counter("dns_names_learned", 1);
}

#[test]
fn udp_server_reply_is_flow_to_server_port() {
    let model = REPLY_MODEL
        .replace("{FLOWS}", "[{ from: internet, to: resolver, port: 53, proto: udp }]")
        .replace(RESOLVER_MATCH, &format!("{RESOLVER_MATCH}    listens: [{{ port: 53, proto: udp }}]\n"));
    let mut world = World::start_with("hK", &model);
    world.serve_udp_in_scope(&format!("{SERVER_V4}:53"));

    let server = SocketAddr::new(SERVER_V4.parse().unwrap(), 53);
    let clients = query_from_fresh_sockets(&world.topology.host("client").netns, server, QUERIES);
    assert_client_ports_ephemeral(&clients);

    // The kernel reports the first datagram from and to each client port, so the server reads
    // five flows, each one connection of the edge from the clients' zone, and its replies to
    // the same five ports add none.
    world.assert_counter("pipeline_udp_flows", 2 * QUERIES as u64);
    world.assert_counter("pipeline_udp_receives", QUERIES as u64);
    world.assert_counter("pipeline_udp_replies", QUERIES as u64);
    world.assert_counter("pipeline_udp_replies_already_received", QUERIES as u64);
    let edge = world.only_udp_edge(53, QUERIES as u64);
    assert_eq!(edge.source, "internet");
    assert_eq!(edge.destination, "resolver");
    assert!(edge.declared, "{edge:?}");

    world.assert_counter("pipeline_deviations_published", 0);
    let raised = world.watcher.deviations();
    assert!(raised.is_empty(), "a declared UDP server raised:\n{}", describe_all(&raised));
}

#[test]
fn undeclared_udp_server_raises_one_flow() {
    let mut world = World::start_with("hK", &REPLY_MODEL.replace("{FLOWS}", "[]"));
    let pid = world.serve_udp_in_scope("0.0.0.0:53");

    let server = SocketAddr::new(SERVER_V4.parse().unwrap(), 53);
    let clients = query_from_fresh_sockets(&world.topology.host("client").netns, server, QUERIES);
    assert_client_ports_ephemeral(&clients);

    let flow = world.wait_for("unexpected-flow on udp/53", |deviation| {
        deviation.category == Category::UnexpectedFlow as i32
    });
    assert_eq!(flow.id, "unexpected-flow@internet@resolver@udp/53");
    assert_eq!(flow.protocol, Protocol::Udp as i32);
    assert_eq!(flow.port, Some(53));
    let (found_pid, exe) = process_of(&flow).unwrap_or_else(|| panic!("no process in {flow:?}"));
    assert_eq!(found_pid, pid);
    assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
    // The deviation keeps the evidence of the first datagram the server read: the first client
    // and the server's unspecified bound address.
    assert_eq!(evidence(&flow).local_addr, clients[0].to_string());
    assert_eq!(evidence(&flow).remote_addr, "0.0.0.0:53");
    world.wait_for("trust-boundary-crossing on udp/53", |deviation| {
        deviation.category == Category::TrustBoundaryCrossing as i32
    });

    world.assert_counter("pipeline_udp_replies", QUERIES as u64);
    let edge = world.only_udp_edge(53, QUERIES as u64);
    assert_eq!(edge.source, "internet");
    assert_eq!(edge.destination, "resolver");
    assert!(!edge.declared, "{edge:?}");

    // The bind raises new-listener. The first datagram raises one unexpected-flow and one
    // trust-boundary-crossing, and the others raise nothing new.
    world.assert_counter("pipeline_deviations_published", 3);
    let raised = world.watcher.deviations();
    let ids: BTreeSet<&str> = raised.iter().map(|deviation| deviation.id.as_str()).collect();
    let expected = BTreeSet::from([
        "new-listener@resolver@0.0.0.0@udp/53",
        "trust-boundary-crossing@internet@resolver@udp/53",
        "unexpected-flow@internet@resolver@udp/53",
    ]);
    assert_eq!(ids, expected, "raised:\n{}", describe_all(&raised));
}

#[test]
fn udp_server_that_never_answers_is_identified() {
    let mut world = World::start_with("hR", &REPLY_MODEL.replace("{FLOWS}", "[]"));
    let server = SocketAddr::new(SERVER_V4.parse().unwrap(), 514);
    let (pid, clients) = world.sink_receives("0.0.0.0:514", CLIENT_V4, server, 2);

    let flow = world.wait_for_sink_flow(514, pid, &clients[0]);
    assert_eq!(evidence(&flow).remote_addr, "0.0.0.0:514");
    assert_eq!(evidence(&flow).netns, netns_inode(&world.topology.host("server").netns));

    let edge = world.only_udp_edge(514, 2);
    assert_eq!(edge.source, "internet");
    assert_eq!(edge.destination, "resolver");
    world.assert_counter("pipeline_udp_receives", 2);
    world.assert_counter("pipeline_udp_replies", 0);
}

#[test]
fn udp_server_over_ipv6_is_identified() {
    let mut world = World::start_with("hS", &REPLY_MODEL.replace("{FLOWS}", "[]"));
    let server = SocketAddr::new(SERVER_V6.parse().unwrap(), 515);
    let (pid, clients) = world.sink_receives("[::]:515", CLIENT_V6, server, 1);

    let flow = world.wait_for_sink_flow(515, pid, &clients[0]);
    assert_eq!(evidence(&flow).remote_addr, "[::]:515");
}

#[test]
fn udp_sender_port_53_two_ports() {
    let mut world = World::start_with("hT", &REPLY_MODEL.replace("{FLOWS}", "[]"));
    let pid = world.start_udp_server("udp-sink", "0.0.0.0:516,0.0.0.0:517");

    // One socket on the DNS port, whose datagrams look like answers, reaches two ports of one
    // process: both are flows of their own.
    let client = SocketAddr::new(CLIENT_V4.parse().unwrap(), 53);
    let targets = [516, 517].map(|port| SocketAddr::new(SERVER_V4.parse().unwrap(), port));
    send_from_one_socket(&world.topology.host("client").netns, client, &targets);
    let sink = world.processes.last().expect("the sink runs");
    sink.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("received 2 ")).unwrap();

    for port in [516, 517] {
        world.wait_for_sink_flow(port, pid, &client);
    }
    world.assert_counter("pipeline_udp_receives", 2);
}

#[test]
fn udp_listener_raises_new_listener() {
    let model = REPLY_MODEL
        .replace("{FLOWS}", "[]")
        .replace(RESOLVER_MATCH, &format!("{RESOLVER_MATCH}    listens: [{{ port: 519, proto: udp }}]\n"));
    let mut world = World::start_with("hU", &model);
    // One socket on an undeclared port, one on the declared port over IPv6.
    let pid = world.start_udp_server("udp-sink", "0.0.0.0:518,[::]:519");

    let listener = world.wait_for("new-listener on udp/518", |deviation| {
        deviation.category == Category::NewListener as i32 && deviation.port == Some(518)
    });
    assert_eq!(listener.id, "new-listener@resolver@0.0.0.0@udp/518");
    assert_eq!(listener.protocol, Protocol::Udp as i32);
    let (found_pid, exe) = process_of(&listener).unwrap_or_else(|| panic!("no process in {listener:?}"));
    assert_eq!(found_pid, pid);
    assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
    assert_eq!(evidence(&listener).local_addr, "0.0.0.0:518");
    assert_eq!(evidence(&listener).netns, netns_inode(&world.topology.host("server").netns));
    assert!(
        listener.resolution.contains("{ port: 518, proto: udp }"),
        "resolution: {}",
        listener.resolution
    );

    // Both binds reached the pipeline, and the declared one raised nothing.
    world.assert_counter("pipeline_udp_binds", 2);
    let raised = world.watcher.deviations();
    let declared: Vec<&Deviation> = raised.iter().filter(|deviation| deviation.port == Some(519)).collect();
    assert!(declared.is_empty(), "the declared listener raised:\n{}", describe_all(&raised));
}

#[test]
fn local_udp_flow_is_one_edge() {
    let mut world = World::start_with("hV", LOCAL_MODEL);
    world.serve_udp_in_scope("0.0.0.0:7010");

    // The client runs on the server's host and sends over loopback, which the zone `internet`
    // covers. The echo server reads each datagram with the client's address and sends it back.
    let (pid, _) = world.run_client_on("server", &["udp-send", "--target", "127.0.0.1:7010", "--count", "3"]);

    let flow = world.wait_for("unexpected-flow on udp/7010", |deviation| {
        deviation.category == Category::UnexpectedFlow as i32 && deviation.port == Some(7010)
    });
    assert_eq!(flow.id, "unexpected-flow@client@resolver@udp/7010");
    let (found_pid, exe) = process_of(&flow).unwrap_or_else(|| panic!("no process in {flow:?}"));
    assert_eq!(found_pid, pid);
    assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
    assert_eq!(evidence(&flow).remote_addr, "127.0.0.1:7010");
    assert_eq!(evidence(&flow).netns, netns_inode(&world.topology.host("server").netns));

    let edge = world.only_udp_edge(7010, 1);
    assert_eq!((edge.source.as_str(), edge.destination.as_str()), ("client", "resolver"));
    let examples: Vec<u32> = edge.examples.iter().map(|example| example.pid).collect();
    assert_eq!(examples, [pid], "{edge:?}");
    // The server's read and its echo belong to the flow the client's datagram joined.
    world.assert_counter("pipeline_udp_flows_joined", 1);
    world.assert_counter("pipeline_udp_server_ends_joined", 2);
    world.assert_counter("pipeline_udp_listeners", 1);
    world.assert_counter("pipeline_deviations_published", 1);
    let raised = world.watcher.deviations();
    let ids: Vec<&str> = raised.iter().map(|deviation| deviation.id.as_str()).collect();
    assert_eq!(ids, ["unexpected-flow@client@resolver@udp/7010"], "raised:\n{}", describe_all(&raised));
}

#[test]
fn local_join_leaves_other_clients() {
    let mut world = World::start_with("hW", LOCAL_MODEL);
    world.start_udp_server("udp-sink", "0.0.0.0:7010");

    // A client in scope, then a client outside the scope on the same host.
    let (pid, _) = world.run_client_on("server", &["udp-send", "--target", "127.0.0.1:7010"]);
    let mut outside = Command::new(&world.service);
    outside.args(["udp-send", "--target", "127.0.0.1:7010"]);
    let mut outside = spawn_in(Some(&world.topology.host("server").netns), None, outside).unwrap();
    outside.wait_success(RUN_TIMEOUT).unwrap();
    let sink = world.processes.last().expect("the sink runs");
    sink.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("received 2 ")).unwrap();

    let joined = world.wait_for("unexpected-flow from the client", |deviation| {
        deviation.id == "unexpected-flow@client@resolver@udp/7010"
    });
    assert_eq!(process_of(&joined).map(|(found, _)| found), Some(pid));
    // The sink's read from the other client is a flow of its own, from the loopback address's
    // zone.
    world.wait_for("unexpected-flow from outside the scope", |deviation| {
        deviation.id == "unexpected-flow@internet@resolver@udp/7010"
    });
    world.assert_counter("pipeline_udp_flows_joined", 1);
    world.assert_counter("pipeline_udp_server_ends_joined", 1);
}

impl World {
    /// Starts a `udp-sink` on `listen` on the server host, in scope, sends it `count` datagrams
    /// from new sockets on the client host, and waits until it has read them. Returns its pid and
    /// the clients' addresses.
    fn sink_receives(&mut self, listen: &str, client_ip: &str, server: SocketAddr, count: usize) -> (u32, Vec<SocketAddr>) {
        let pid = self.start_udp_server("udp-sink", listen);
        let clients = send_from_fresh_sockets(&self.topology.host("client").netns, client_ip, server, count);
        let sink = self.processes.last().expect("the sink runs");
        sink.wait_for_line(RUN_TIMEOUT, |line| line.starts_with(&format!("received {count} "))).unwrap();
        (pid, clients)
    }

    /// Waits for the unexpected-flow deviation to the sink on `port` and checks that it names the
    /// sink with `pid` and the first client `client`.
    fn wait_for_sink_flow(&self, port: u16, pid: u32, client: &SocketAddr) -> Deviation {
        let flow = self.wait_for(&format!("unexpected-flow on udp/{port}"), |deviation| {
            deviation.category == Category::UnexpectedFlow as i32 && deviation.port == Some(u32::from(port))
        });
        assert_eq!(flow.id, format!("unexpected-flow@internet@resolver@udp/{port}"));
        let (found_pid, exe) = process_of(&flow).unwrap_or_else(|| panic!("no process in {flow:?}"));
        assert_eq!(found_pid, pid);
        assert!(exe.ends_with("/driftwatch-demo-service"), "exe {exe}");
        assert_eq!(evidence(&flow).local_addr, client.to_string());
        flow
    }
}

/// Sends one datagram to each of `targets` from one socket bound to `client`, from a thread in
/// `netns`.
fn send_from_one_socket(netns: &NetNs, client: SocketAddr, targets: &[SocketAddr]) {
    let namespace = fs::File::open(netns.path()).unwrap();
    let targets = targets.to_vec();
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on a descriptor this thread owns; it moves only this thread.
        let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns failed: {}", std::io::Error::last_os_error());
        let socket = UdpSocket::bind(client).unwrap();
        for target in targets {
            socket.send_to(b"message", target).unwrap();
        }
    });
    thread.join().expect("the UDP client thread panicked");
}

/// Sends one datagram to `server` from each of `count` new sockets, from a thread in `netns`,
/// and returns the sockets' addresses, `client_ip` with the port each got.
fn send_from_fresh_sockets(netns: &NetNs, client_ip: &str, server: SocketAddr, count: usize) -> Vec<SocketAddr> {
    let client_ip: std::net::IpAddr = client_ip.parse().unwrap();
    let namespace = fs::File::open(netns.path()).unwrap();
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on a descriptor this thread owns; it moves only this thread.
        let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns failed: {}", std::io::Error::last_os_error());
        (0..count)
            .map(|index| {
                let unbound = if client_ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                let socket = UdpSocket::bind(unbound).unwrap();
                socket.send_to(format!("message {index}").as_bytes(), server).unwrap();
                let local = socket.local_addr().unwrap();
                SocketAddr::new(client_ip, local.port())
            })
            .collect()
    });
    thread.join().expect("the UDP client thread panicked")
}

/// Sends `count` queries to the UDP echo server at `server` from a thread in `netns`, each from
/// a new socket on an ephemeral port, and waits for each echo. Returns the sockets' addresses.
fn query_from_fresh_sockets(netns: &NetNs, server: SocketAddr, count: usize) -> Vec<SocketAddr> {
    let namespace = fs::File::open(netns.path()).unwrap();
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on a descriptor this thread owns; it moves only this thread.
        let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns failed: {}", std::io::Error::last_os_error());
        let mut clients = Vec::new();
        for index in 0..count {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(RUN_TIMEOUT)).unwrap();
            let query = format!("query {index}");
            socket.send_to(query.as_bytes(), server).unwrap();
            let mut buffer = [0u8; 64];
            let (length, from) = socket
                .recv_from(&mut buffer)
                .unwrap_or_else(|error| panic!("no answer from {server} to {query:?}: {error}"));
            assert_eq!(from, server);
            assert_eq!(&buffer[..length], query.as_bytes());
            // The socket was unbound, so its address is known only after the send.
            let local = socket.local_addr().unwrap();
            clients.push(SocketAddr::new(CLIENT_V4.parse().unwrap(), local.port()));
        }
        clients
    });
    thread.join().expect("the UDP client thread panicked")
}

/// Checks that the client ports differ and lie in the ephemeral range of this namespace, which
/// the agent reads at start-up.
fn assert_client_ports_ephemeral(clients: &[SocketAddr]) {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let bounds: Vec<u16> = range.split_whitespace().map(|port| port.parse().unwrap()).collect();
    let ports: BTreeSet<u16> = clients.iter().map(SocketAddr::port).collect();
    assert_eq!(ports.len(), clients.len(), "client ports repeat: {clients:?}");
    for port in ports {
        assert!((bounds[0]..=bounds[1]).contains(&port), "client port {port} is outside {range:?}");
    }
}

/// What the test's DNS server answers for a name.
#[derive(Clone, Copy)]
enum Answer {
    A(std::net::Ipv4Addr),
    Cname(&'static str),
}

/// A DNS server on a thread that entered a test namespace: it answers A queries from a fixed
/// table, following CNAMEs within the table, and counts the queries it answered.
struct DnsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u32>>,
}

impl DnsServer {
    fn start(netns: &NetNs, address: SocketAddr, table: Vec<(&'static str, Answer)>) -> DnsServer {
        let namespace = fs::File::open(netns.path()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_sender, ready) = std::sync::mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                // SAFETY: setns on a descriptor this thread owns; it moves only this thread.
                let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(entered, 0, "setns failed: {}", std::io::Error::last_os_error());
                let socket = UdpSocket::bind(address).unwrap();
                socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                ready_sender.send(()).unwrap();
                let mut answered = 0;
                let mut buffer = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((length, peer)) = socket.recv_from(&mut buffer) else { continue };
                    if let Some(reply) = answer(&buffer[..length], &table) {
                        socket.send_to(&reply, peer).unwrap();
                        answered += 1;
                    }
                }
                answered
            })
        };
        ready.recv_timeout(RUN_TIMEOUT).expect("the DNS server did not start");
        DnsServer { stop, thread: Some(thread) }
    }

    /// Stops the server and returns how many queries it answered.
    fn stop(mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |thread| thread.join().expect("the DNS server panicked"))
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Builds the answer to a query, with every record its name leads to in the table; `None` for
/// anything but a well-formed single question.
fn answer(query: &[u8], table: &[(&'static str, Answer)]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    let mut position = 12;
    let mut labels = Vec::new();
    loop {
        let length = usize::from(*query.get(position)?);
        position += 1;
        if length == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(position..position + length)?).into_owned());
        position += length;
    }
    let question_end = position + 4;
    let mut reply = query.get(..question_end)?.to_vec();
    reply[2] = 0x81;
    reply[3] = 0x80;

    let mut name = labels.join(".");
    let mut records = 0u16;
    for _ in 0..table.len() {
        let Some((_, found)) = table.iter().find(|(entry, _)| *entry == name) else { break };
        reply.extend(encode_name(&name));
        match found {
            Answer::A(address) => {
                reply.extend([0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
                reply.extend(address.octets());
                records += 1;
                break;
            }
            Answer::Cname(target) => {
                let target_bytes = encode_name(target);
                reply.extend([0, 5, 0, 1, 0, 0, 0, 30]);
                reply.extend((target_bytes.len() as u16).to_be_bytes());
                reply.extend(target_bytes);
                records += 1;
                name = target.to_string();
            }
        }
    }
    reply[6..8].copy_from_slice(&records.to_be_bytes());
    Some(reply)
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend(label.as_bytes());
    }
    out.push(0);
    out
}

#[test]
fn dns_server_answers_cname_chain() {
    let table = vec![("a.test", Answer::Cname("b.test")), ("b.test", Answer::A("10.0.0.1".parse().unwrap()))];
    let mut query = vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend(encode_name("a.test"));
    query.extend([0, 1, 0, 1]);
    let reply = answer(&query, &table).unwrap();
    assert_eq!(&reply[..2], &[0xab, 0xcd]);
    assert_eq!(&reply[6..8], &[0, 2]);
    assert!(reply.ends_with(&[0, 4, 10, 0, 0, 1]), "{reply:?}");
}
