//! Raw events in the deviation stream, on real kernel events. An agent is scoped to the test's
//! cgroups. Clients request process and TCP events, filter them with allow and deny lists, or
//! request none, and resume events by their own sequence.
//!
//! Every test starts its own agent; they run one at a time because each loads the kernel programs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use driftwatch_e2e::stream::status;
use driftwatch_e2e::{
    driftwatch_bin, require_root, spawn_in, unique_suffix, wait_until, AgentUnderTest, Cgroup, DeviationWatcher, EventEntry,
    ProcessGuard, Topology,
};
use driftwatch_proto::v1::{DeviationFilter, EventKind, Protocol, RawEvent, StreamDeviationsRequest};

/// How long the agent may take to turn a kernel event into a streamed event.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a short program may run.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

const CLIENT_V4: &str = "198.18.1.10";
const SERVER_V4: &str = "198.18.2.10";
const SERVER_PORT: u16 = 7000;
const REQUEST_BYTES: u64 = 1000;
const RESPONSE_BYTES: u64 = 500;
const PERL: &str = "/usr/bin/perl";
/// Servers that reply with their pid, and a client that prints who served it.
const PROBE: &str = env!("CARGO_BIN_EXE_driftwatch-accept-probe");

/// Accepts one connection on ARGV[0], reads exactly 1000 bytes, sends 500 back and waits for the
/// client to close.
const SERVER_SCRIPT: &str = r#"use IO::Socket::INET; $| = 1;
my $listener = IO::Socket::INET->new(LocalAddr => $ARGV[0], Listen => 8, ReuseAddr => 1) or die "listen: $!";
print "listening\n";
my $connection = $listener->accept or die "accept: $!";
my ($got, $buffer) = (0, "");
while ($got < 1000) { my $read = sysread($connection, $buffer, 1000 - $got); die "short request" unless $read; $got += $read; }
syswrite($connection, "r" x 500) == 500 or die "write: $!";
while (sysread($connection, $buffer, 4096)) {}
close $connection;"#;

/// Connects to ARGV[0], prints its local port, sends exactly 1000 bytes, reads the 500-byte
/// response and closes.
const CLIENT_SCRIPT: &str = r#"use IO::Socket::INET; $| = 1;
my $socket = IO::Socket::INET->new(PeerAddr => $ARGV[0], Proto => "tcp") or die "connect: $!";
print "local ", $socket->sockport, "\n";
syswrite($socket, "q" x 1000) == 1000 or die "write: $!";
my ($got, $buffer) = (0, "");
while ($got < 500) { my $read = sysread($socket, $buffer, 500 - $got); die "short answer" unless $read; $got += $read; }
close $socket;"#;

/// Declares the client in dmz and the server in core, selected by cgroup; `{ROOT}` becomes the
/// test's cgroup.
const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: dmz, trust: 40 }
  - { id: core, trust: 80 }
components:
  - id: client
    zone: dmz
    match: { cgroup: ["{ROOT}/client"] }
    executables: ["/usr/bin/perl"]
  - id: server
    zone: core
    match: { cgroup: ["{ROOT}/server"] }
    listens: [{ port: 7000 }]
    executables: ["/usr/bin/perl"]
flows:
  - { from: client, to: server, port: 7000 }
exceptions: []
"#;

static AGENT_TESTS: Mutex<()> = Mutex::new(());

/// Hosts client and server in namespaces of their own, cgroups client and server under the
/// agent's scope, and the agent. Fields drop in order: processes, agent, cgroups, namespaces.
struct World {
    processes: Vec<ProcessGuard>,
    agent: AgentUnderTest,
    client: Cgroup,
    server: Cgroup,
    root: Cgroup,
    topology: Topology,
    _model: tempfile::NamedTempFile,
    _serial: MutexGuard<'static, ()>,
}

impl World {
    fn start() -> World {
        let serial = AGENT_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        require_root().unwrap();
        let mut topology = Topology::tagged("hH").unwrap();
        topology.add_host("client", &format!("{CLIENT_V4}/24"), "fd00:d5:1::10/64").unwrap();
        topology.add_host("server", &format!("{SERVER_V4}/24"), "fd00:d5:2::10/64").unwrap();
        let root = Cgroup::create(&format!("dw-hH-events-{}", unique_suffix())).unwrap();
        let client = root.child("client").unwrap();
        let server = root.child("server").unwrap();
        let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        fs::write(model.path(), MODEL.replace("{ROOT}", root.relative_path())).unwrap();
        let agent = AgentUnderTest::start_with(&driftwatch_bin().unwrap(), model.path(), root.path(), &[]).unwrap();
        World {
            processes: Vec::new(),
            agent,
            client,
            server,
            root,
            topology,
            _model: model,
            _serial: serial,
        }
    }

    fn cgroup(&self, name: &str) -> &Cgroup {
        match name {
            "client" => &self.client,
            "server" => &self.server,
            other => panic!("no cgroup {other:?} in the test world"),
        }
    }

    /// Starts `program` with `args` on host `name` in the cgroup of the same name.
    fn spawn(&self, name: &str, program: &str, args: &[&str]) -> ProcessGuard {
        let mut command = Command::new(program);
        command.args(args);
        spawn_in(Some(&self.topology.host(name).netns), Some(self.cgroup(name)), command).unwrap()
    }

    /// Runs `program` on host `name` until it exits with `expected_code`; returns its pid.
    fn run(&self, name: &str, program: &str, args: &[&str], expected_code: i32) -> u32 {
        let mut process = self.spawn(name, program, args);
        let status = process.wait_exit(RUN_TIMEOUT).unwrap();
        assert_eq!(status.code(), Some(expected_code), "{program} {args:?}: {}", process.stderr());
        process.pid()
    }

    fn subscribe(&self, request: StreamDeviationsRequest) -> DeviationWatcher {
        DeviationWatcher::subscribe_with(self.agent.api_addr(), request).unwrap()
    }

    fn wait_for_event(&self, watcher: &DeviationWatcher, what: &str, accept: impl Fn(&RawEvent) -> bool) -> EventEntry {
        watcher
            .wait_for_event(what, OBSERVE_TIMEOUT, accept)
            .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", self.agent.log()))
    }

    fn netns_inode(&self, name: &str) -> u32 {
        let path = self.topology.host(name).netns.path();
        let inode = fs::metadata(&path).unwrap().ino();
        u32::try_from(inode).unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.processes.clear();
        let _ = self.root.kill_remaining();
    }
}

fn events_request(kinds: &[EventKind]) -> StreamDeviationsRequest {
    StreamDeviationsRequest {
        events: kinds.iter().map(|kind| *kind as i32).collect(),
        ..Default::default()
    }
}

fn is_kind(event: &RawEvent, kind: EventKind) -> bool {
    event.kind == kind as i32
}

fn pid_of(event: &RawEvent) -> Option<u32> {
    event.process.as_ref().map(|process| process.pid)
}

#[test]
fn exec_and_exit_carry_process() {
    let world = World::start();
    let watcher = world.subscribe(events_request(&[EventKind::ProcessExec, EventKind::ProcessExit]));

    let pid = world.run("client", PERL, &["-e", "exit 3"], 3);

    let exec = world.wait_for_event(&watcher, "the exec of perl", |event| {
        is_kind(event, EventKind::ProcessExec) && pid_of(event) == Some(pid)
    });
    let process = exec.event.process.as_ref().unwrap();
    assert_eq!(process.exe, PERL);
    assert_eq!(process.argv, vec![PERL.to_string(), "-e".into(), "exit 3".into()]);
    assert_eq!(process.ppid, std::process::id(), "the test process forked it");
    assert_eq!(process.cgroup, format!("{}/client", world.root.relative_path()));
    assert_eq!(exec.event.component, "client");
    assert_eq!(exec.event.zone.as_deref(), Some("dmz"));
    assert!(exec.event.time.is_some());
    assert!(exec.sequence >= 1);

    let exit = world.wait_for_event(&watcher, "the exit of perl", |event| {
        is_kind(event, EventKind::ProcessExit) && pid_of(event) == Some(pid)
    });
    assert_eq!(exit.event.exit_code, Some(3 << 8), "exit status as wait(2) reports it");
    assert!(exit.sequence > exec.sequence);
    assert!(watcher.event_losses().is_empty(), "{:?}", watcher.event_losses());
}

#[test]
fn tcp_events_carry_tuple_and_bytes() {
    let mut world = World::start();
    let watcher = world.subscribe(events_request(&[
        EventKind::TcpConnect,
        EventKind::TcpAccept,
        EventKind::TcpListen,
        EventKind::TcpClose,
    ]));
    let listen_addr = format!("{SERVER_V4}:{SERVER_PORT}");
    let server = world.spawn("server", PERL, &["-e", SERVER_SCRIPT, &listen_addr]);
    server.wait_for_line(RUN_TIMEOUT, |line| line == "listening").unwrap();
    let server_pid = server.pid();
    world.processes.push(server);

    let mut client = world.spawn("client", PERL, &["-e", CLIENT_SCRIPT, &listen_addr]);
    let lines = client.wait_success(RUN_TIMEOUT).unwrap();
    let client_pid = client.pid();
    let local_port: u16 = lines
        .iter()
        .find_map(|line| line.strip_prefix("local "))
        .unwrap_or_else(|| panic!("the client printed no local port: {lines:?}"))
        .parse()
        .unwrap();
    let client_addr = format!("{CLIENT_V4}:{local_port}");

    let listen = world.wait_for_event(&watcher, "the server's listen", |event| {
        is_kind(event, EventKind::TcpListen) && pid_of(event) == Some(server_pid)
    });
    assert_eq!(listen.event.local_addr, listen_addr);
    assert_eq!(listen.event.remote_addr, "");
    assert_eq!(listen.event.component, "server");

    let connect = world.wait_for_event(&watcher, "the client's connect", |event| {
        is_kind(event, EventKind::TcpConnect) && pid_of(event) == Some(client_pid)
    });
    assert_eq!(connect.event.remote_addr, listen_addr);
    assert_eq!(connect.event.protocol, Protocol::Tcp as i32);
    assert_eq!(connect.event.netns, world.netns_inode("client"));

    let close = world.wait_for_event(&watcher, "the client's close", |event| {
        is_kind(event, EventKind::TcpClose) && pid_of(event) == Some(client_pid)
    });
    assert_eq!(close.event.local_addr, client_addr);
    assert_eq!(close.event.remote_addr, listen_addr);
    assert_eq!(close.event.netns, world.netns_inode("client"));
    assert_eq!(close.event.bytes_sent, REQUEST_BYTES);
    assert_eq!(close.event.bytes_received, RESPONSE_BYTES);
    assert_eq!(close.event.component, "client");
    // The remote end resolves by its address alone, and 198.18.0.0/15 falls in the internet zone.
    assert_eq!(close.event.remote_component, "internet");
    assert_eq!(close.event.remote_zone.as_deref(), Some("internet"));
    assert!(close.sequence > connect.sequence);

    let accept = world.wait_for_event(&watcher, "the server's accept", |event| {
        is_kind(event, EventKind::TcpAccept) && pid_of(event) == Some(server_pid)
    });
    assert_eq!(accept.event.local_addr, listen_addr);
    assert_eq!(accept.event.remote_addr, client_addr);
    assert_eq!(accept.event.netns, world.netns_inode("server"));

    let server_close = world.wait_for_event(&watcher, "the server's close", |event| {
        is_kind(event, EventKind::TcpClose) && pid_of(event) == Some(server_pid)
    });
    assert_eq!(server_close.event.local_addr, listen_addr);
    assert_eq!(server_close.event.remote_addr, client_addr);
    assert_eq!(server_close.event.bytes_sent, RESPONSE_BYTES);
    assert_eq!(server_close.event.bytes_received, REQUEST_BYTES);
}

fn exe_filter(pattern: &str) -> DeviationFilter {
    DeviationFilter {
        executables: vec![pattern.to_string()],
        ..Default::default()
    }
}

#[test]
fn executable_filter_keeps_matching_events() {
    let world = World::start();
    let everything = world.subscribe(events_request(&[EventKind::ProcessExec]));
    let filtered = world.subscribe(StreamDeviationsRequest {
        allow: vec![exe_filter(PERL)],
        ..events_request(&[EventKind::ProcessExec])
    });

    let true_pid = world.run("client", "/bin/true", &[], 0);
    let perl_pid = world.run("client", PERL, &["-e", "exit 0"], 0);

    world.wait_for_event(&everything, "the exec of true", |event| pid_of(event) == Some(true_pid));
    world.wait_for_event(&filtered, "the exec of perl", |event| pid_of(event) == Some(perl_pid));
    // The stream is in sequence order and true ran before perl, so its exec would be here by now.
    let pids: Vec<Option<u32>> = filtered.events().iter().map(|entry| pid_of(&entry.event)).collect();
    assert_eq!(pids, vec![Some(perl_pid)]);
}

#[test]
fn deny_filter_removes_events() {
    let world = World::start();
    let everything = world.subscribe(events_request(&[EventKind::ProcessExec]));
    let filtered = world.subscribe(StreamDeviationsRequest {
        deny: vec![exe_filter(PERL)],
        ..events_request(&[EventKind::ProcessExec])
    });

    let perl_pid = world.run("client", PERL, &["-e", "exit 0"], 0);
    let true_pid = world.run("client", "/bin/true", &[], 0);

    world.wait_for_event(&everything, "the exec of perl", |event| pid_of(event) == Some(perl_pid));
    world.wait_for_event(&filtered, "the exec of true", |event| pid_of(event) == Some(true_pid));
    let pids: Vec<Option<u32>> = filtered.events().iter().map(|entry| pid_of(&entry.event)).collect();
    assert_eq!(pids, vec![Some(true_pid)], "perl's exec was denied");
}

#[test]
fn client_without_events_gets_none() {
    let world = World::start();
    let plain = world.subscribe(StreamDeviationsRequest {
        from_sequence: Some(0),
        ..Default::default()
    });
    let with_events = world.subscribe(events_request(&[EventKind::ProcessExec, EventKind::ProcessExit]));

    // /bin/true is no executable of the client component, so it raises a deviation too.
    let pid = world.run("client", "/bin/true", &[], 0);
    world.wait_for_event(&with_events, "the exit of true", |event| {
        is_kind(event, EventKind::ProcessExit) && pid_of(event) == Some(pid)
    });
    plain
        .wait_for("the unexpected executable", OBSERVE_TIMEOUT, |deviation| {
            deviation.evidence.as_ref().and_then(|evidence| evidence.process.as_ref()).map(|process| process.pid) == Some(pid)
        })
        .unwrap();
    assert_eq!(plain.events(), Vec::new());
    assert_eq!(plain.event_losses(), Vec::new());
}

#[test]
fn resume_replays_missed_events() {
    let world = World::start();
    let kinds = [EventKind::ProcessExec];
    // Keeps exec events recorded while the resuming client is away.
    let steady = world.subscribe(events_request(&kinds));

    let first = world.run("client", "/bin/true", &[], 0);
    let leaving = world.subscribe(events_request(&kinds));
    let second = world.run("client", "/bin/true", &[], 0);
    let seen = world.wait_for_event(&leaving, "the second exec", |event| pid_of(event) == Some(second));
    drop(leaving);

    let third = world.run("client", "/bin/true", &[], 0);
    let fourth = world.run("client", PERL, &["-e", "exit 0"], 0);
    world.wait_for_event(&steady, "the fourth exec", |event| pid_of(event) == Some(fourth));

    let resumed = world.subscribe(StreamDeviationsRequest {
        from_event_sequence: Some(seen.sequence + 1),
        ..events_request(&kinds)
    });
    world.wait_for_event(&resumed, "the fourth exec again", |event| pid_of(event) == Some(fourth));
    let missed: Vec<(u64, Option<u32>)> =
        resumed.events().iter().map(|entry| (entry.sequence, pid_of(&entry.event))).collect();
    let expected: Vec<(u64, Option<u32>)> = steady
        .events()
        .iter()
        .filter(|entry| entry.sequence > seen.sequence)
        .map(|entry| (entry.sequence, pid_of(&entry.event)))
        .collect();
    assert_eq!(missed, expected);
    let pids: Vec<Option<u32>> = missed.iter().map(|(_, pid)| *pid).collect();
    assert_eq!(pids, vec![Some(third), Some(fourth)]);
    assert!(steady.events().iter().any(|entry| pid_of(&entry.event) == Some(first)));
    assert!(resumed.event_losses().is_empty(), "{:?}", resumed.event_losses());

    let counter = |name: &str| {
        let counters = status(world.agent.api_addr()).unwrap().counters;
        counters.iter().find(|counter| counter.name == name).map(|counter| counter.value)
    };
    assert_eq!(counter("events_published"), Some(4), "four execs while a client wanted them");
    assert_eq!(counter("events_dropped_slow"), Some(0));
    // The agent notices the departed client when its connection closes, a moment after the drop.
    let subscribers = wait_until(OBSERVE_TIMEOUT, || (counter("events_subscribers") == Some(2)).then_some(()));
    assert!(subscribers.is_some(), "events_subscribers is {:?}, expected 2", counter("events_subscribers"));
}

#[test]
fn event_resume_past_next_sequence_is_rejected() {
    let world = World::start();
    let error = DeviationWatcher::subscribe_with(
        world.agent.api_addr(),
        StreamDeviationsRequest {
            from_event_sequence: Some(1_000_000),
            ..events_request(&[EventKind::ProcessExec])
        },
    )
    .err()
    .expect("a resume past the next event sequence is rejected");
    let message = format!("{error:#}");
    assert!(message.contains("from_event_sequence: replay start 1000000 is ahead of the newest sequence, 0,"), "{message}");
}

#[test]
fn watch_prints_events_as_text_and_jsonl() {
    let world = World::start();
    let watch = |format: &str| {
        let mut command = Command::new(driftwatch_bin().unwrap());
        command.args(["watch", "--api", &world.agent.api_arg(), "--events", "process-exec", "--format", format]);
        spawn_in(None, None, command).unwrap()
    };
    let jsonl = watch("jsonl");
    let text = watch("text");
    let counter = |name: &str| {
        let counters = status(world.agent.api_addr()).unwrap().counters;
        counters.iter().find(|counter| counter.name == name).map(|counter| counter.value)
    };
    let subscribed = wait_until(OBSERVE_TIMEOUT, || (counter("events_subscribers") == Some(2)).then_some(()));
    assert!(subscribed.is_some(), "both watch clients subscribe: {}{}", jsonl.stderr(), text.stderr());

    let pid = world.run("client", PERL, &["-e", "exit 0"], 0);

    let pid_field = format!("\"pid\":{pid},");
    let line = jsonl
        .wait_for_line(OBSERVE_TIMEOUT, |line| line.contains(&pid_field))
        .unwrap_or_else(|error| panic!("{error:#}\nwatch stderr: {}", jsonl.stderr()));
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["type"], "event");
    assert_eq!(record["kind"], "process-exec");
    assert_eq!(record["process"]["pid"], pid);
    assert_eq!(record["process"]["exe"], PERL);
    assert_eq!(record["component"], "client");
    assert!(record["sequence"].as_u64().is_some_and(|sequence| sequence >= 1), "{line}");

    let header = text
        .wait_for_line(OBSERVE_TIMEOUT, |line| line.contains("EVENT     process-exec"))
        .unwrap_or_else(|error| panic!("{error:#}\nwatch stderr: {}", text.stderr()));
    assert!(header.contains(" #e"), "{header}");
    let process_line = format!("process    pid {pid} (ppid {}) {PERL}", std::process::id());
    text.wait_for_line(OBSERVE_TIMEOUT, |line| line.trim() == process_line)
        .unwrap_or_else(|error| panic!("{error:#}\nwatch output: {:?}", text.stdout_lines()));
}

#[test]
fn io_uring_accept_has_its_event() {
    let mut world = World::start();
    let watcher = world.subscribe(events_request(&[EventKind::TcpAccept]));
    let server = world.spawn("server", PROBE, &["uring-listen"]);
    let addr = server
        .wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening "))
        .unwrap()
        .trim_start_matches("listening ")
        .to_string();
    let server_pid = server.pid();
    world.processes.push(server);

    // The client shares the server's namespace, to reach its loopback address.
    let mut client = world.spawn("server", PROBE, &["connect", &addr]);
    let lines = client.wait_success(RUN_TIMEOUT).unwrap();
    let served: Vec<&str> = lines
        .iter()
        .find_map(|line| line.strip_prefix("served "))
        .unwrap_or_else(|| panic!("the client printed nothing served: {lines:?}"))
        .split(' ')
        .collect();
    assert_eq!(served[0], server_pid.to_string(), "the server accepted the connection");
    let client_addr = served[1];

    // An io-wq worker thread of the server ran the accept, and the event names the process.
    let accept = world.wait_for_event(&watcher, "the io_uring accept", |event| {
        is_kind(event, EventKind::TcpAccept) && event.remote_addr == client_addr
    });
    assert_eq!(pid_of(&accept.event), Some(server_pid));
    assert_eq!(accept.event.local_addr, addr);
    assert_eq!(accept.event.netns, world.netns_inode("server"));
    assert_eq!(accept.event.component, "server");
}

#[test]
fn passed_listener_from_outside_scope_reports_close() {
    let mut world = World::start();
    let watcher = world.subscribe(events_request(&[EventKind::TcpAccept, EventKind::TcpClose]));
    let socket_dir = tempfile::tempdir().unwrap();
    let path = socket_dir.path().join("listener.sock");
    let path = path.to_str().unwrap();
    let receiver = world.spawn("server", PROBE, &["receive-listener", path]);
    receiver.wait_for_line(RUN_TIMEOUT, |line| line == "ready").unwrap();
    let receiver_pid = receiver.pid();
    world.processes.push(receiver);

    // The sender listens outside the scope, so the kernel records its listener as out of scope,
    // and passes the socket to the receiver, in scope.
    let mut command = Command::new(PROBE);
    command.args(["pass-listener", path]);
    let sender = spawn_in(Some(&world.topology.host("server").netns), None, command).unwrap();
    let addr = sender
        .wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening "))
        .unwrap()
        .trim_start_matches("listening ")
        .to_string();
    sender.wait_for_line(RUN_TIMEOUT, |line| line == "passed").unwrap();
    world.processes.push(sender);

    let mut client = world.spawn("server", PROBE, &["connect", &addr]);
    let lines = client.wait_success(RUN_TIMEOUT).unwrap();
    let reply = format!("{receiver_pid}\n");
    assert!(lines.iter().any(|line| line.starts_with(&format!("served {receiver_pid} "))), "{lines:?}");

    world.wait_for_event(&watcher, "the receiver's accept", |event| {
        is_kind(event, EventKind::TcpAccept) && pid_of(event) == Some(receiver_pid)
    });
    // The accepted socket keeps the state changes it inherited from the listener, so its close is
    // reported with its bytes.
    let close = world.wait_for_event(&watcher, "the receiver's close", |event| {
        is_kind(event, EventKind::TcpClose) && pid_of(event) == Some(receiver_pid)
    });
    assert_eq!(close.event.local_addr, addr);
    assert_eq!(close.event.bytes_sent, reply.len() as u64);
    assert_eq!(close.event.bytes_received, 0);
}

#[test]
fn io_uring_accepts_sharing_user_data_have_events() {
    let mut world = World::start();
    let watcher = world.subscribe(events_request(&[EventKind::TcpAccept]));
    let server = world.spawn("server", PROBE, &["uring-listen-two"]);
    let server_pid = server.pid();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let line = server
            .wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening ") && !addrs.iter().any(|addr: &String| line.ends_with(addr.as_str())))
            .unwrap();
        addrs.push(line.trim_start_matches("listening ").to_string());
    }
    world.processes.push(server);

    // Both accepts wait on one ring with user data 0. The one armed first completes first, and
    // must still be known as an accept after the second was armed.
    for addr in &addrs {
        let mut client = world.spawn("server", PROBE, &["connect", addr]);
        let lines = client.wait_success(RUN_TIMEOUT).unwrap();
        assert!(lines.iter().any(|line| line.starts_with(&format!("served {server_pid} "))), "{lines:?}");
        world.wait_for_event(&watcher, &format!("the accept on {addr}"), |event| {
            is_kind(event, EventKind::TcpAccept) && pid_of(event) == Some(server_pid) && &event.local_addr == addr
        });
    }
}
