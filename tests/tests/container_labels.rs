//! Container and pod label selectors end to end. Processes run in cgroups laid out like kubelet's
//! and Docker's and talk over a veth pair between two network namespaces. A fake CRI runtime and a
//! fake Docker Engine serve labels on unix sockets, and the real agent attributes the traffic.
//!
//! Needs root and `DRIFTWATCH_BIN` (set by `cargo xtask test`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driftwatch_e2e::stream::{self, describe_all};
use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, spawn_in, unique_suffix, wait_until,
    AgentUnderTest, Cgroup, DeviationWatcher, NetNs, ProcessGuard,
};
use driftwatch_proto::cri;
use driftwatch_proto::cri::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use driftwatch_proto::v1::{Category, ContainerLabelsState, Deviation, ProcessInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

const POD_UID: &str = "6f1d2c3b-4a59-4e8f-9d7c-0b1a2c3d4e5f";
const SANDBOX_ID: &str = "sandbox-checkout";
const CLIENT_V4: &str = "198.18.200.1";
const SERVER_V4: &str = "198.18.200.2";
/// Delay of the fake CRI runtime's ContainerStatus reply. It is longer than the client takes to
/// start and connect, so the connection is observed before the labels arrive.
const CRI_DELAY: Duration = Duration::from_millis(500);

const MODEL: &str = r#"version: 1
zones:
  - { id: outside, trust: 0, match: { cidrs: ["0.0.0.0/0"] } }
  - { id: apps, trust: 50 }
components:
  - id: checkout
    zone: apps
    match: { pod: { app: checkout } }
    executables: ["**/driftwatch-demo-service"]
  - id: store
    zone: apps
    criticality: high
    match: { container: { com.docker.compose.service: store } }
    listens: [{ port: 5432 }]
    executables: ["**/driftwatch-demo-service"]
flows: []
exceptions: []
"#;

fn container_id(seed: &str) -> String {
    // 64 hex digits, unique per run so that leftovers of another run never collide.
    let digits: String = format!("{seed}{}", unique_suffix()).bytes().map(|byte| format!("{:02x}", byte)).collect();
    format!("{digits:0<64}").chars().take(64).collect()
}

/// A fake containerd: serves the three CRI calls the agent makes for one known container and
/// counts the ContainerStatus calls for it.
#[derive(Clone)]
struct FakeCri {
    container_id: String,
    container_status_calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl RuntimeService for FakeCri {
    async fn container_status(
        &self,
        request: tonic::Request<cri::ContainerStatusRequest>,
    ) -> Result<tonic::Response<cri::ContainerStatusResponse>, tonic::Status> {
        let id = request.into_inner().container_id;
        if id != self.container_id {
            return Err(tonic::Status::not_found(format!("container {id} not found")));
        }
        self.container_status_calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(CRI_DELAY).await;
        let labels = HashMap::from([
            ("io.kubernetes.container.name".to_string(), "checkout".to_string()),
            ("io.kubernetes.pod.namespace".to_string(), "shop".to_string()),
        ]);
        let status = cri::ContainerStatus {
            id,
            metadata: Some(cri::ContainerMetadata { name: "checkout".to_string(), attempt: 0 }),
            state: cri::ContainerState::ContainerRunning as i32,
            image: Some(cri::ImageSpec { image: "registry.example/checkout:1.4".to_string() }),
            labels,
        };
        Ok(tonic::Response::new(cri::ContainerStatusResponse { status: Some(status) }))
    }

    async fn list_containers(
        &self,
        request: tonic::Request<cri::ListContainersRequest>,
    ) -> Result<tonic::Response<cri::ListContainersResponse>, tonic::Status> {
        let requested = request.into_inner().filter.map(|filter| filter.id).unwrap_or_default();
        let containers = (requested == self.container_id)
            .then(|| cri::Container {
                id: requested,
                pod_sandbox_id: SANDBOX_ID.to_string(),
                metadata: Some(cri::ContainerMetadata { name: "checkout".to_string(), attempt: 0 }),
                labels: HashMap::new(),
            })
            .into_iter()
            .collect();
        Ok(tonic::Response::new(cri::ListContainersResponse { containers }))
    }

    async fn pod_sandbox_status(
        &self,
        request: tonic::Request<cri::PodSandboxStatusRequest>,
    ) -> Result<tonic::Response<cri::PodSandboxStatusResponse>, tonic::Status> {
        let id = request.into_inner().pod_sandbox_id;
        if id != SANDBOX_ID {
            return Err(tonic::Status::not_found(format!("sandbox {id} not found")));
        }
        let status = cri::PodSandboxStatus {
            id,
            metadata: Some(cri::PodSandboxMetadata {
                name: "checkout-6c9f4".to_string(),
                uid: POD_UID.to_string(),
                namespace: "shop".to_string(),
                attempt: 0,
            }),
            labels: HashMap::from([
                ("app".to_string(), "checkout".to_string()),
                ("pod-template-hash".to_string(), "6c9f4".to_string()),
            ]),
        };
        Ok(tonic::Response::new(cri::PodSandboxStatusResponse { status: Some(status) }))
    }
}

/// A fake Docker Engine: replies to `GET /containers/<id>/json` with the name and labels of the
/// containers in `containers` and with 404 for others. It reads one request per connection, as
/// the agent sends them.
async fn serve_docker(listener: UnixListener, containers: HashMap<String, (String, String)>, cancel: CancellationToken) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => return,
            },
        };
        let containers = containers.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => request.extend_from_slice(&buffer[..read]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
            let id = path.trim_start_matches("/containers/").trim_end_matches("/json");
            let (status, body) = match containers.get(id) {
                Some((name, service)) => (
                    "200 OK",
                    format!(
                        r#"{{"Id":"{id}","Name":"/{name}","Config":{{"Image":"store:2","Labels":{{"com.docker.compose.service":"{service}","com.docker.compose.project":"shop"}}}}}}"#
                    ),
                ),
                None => ("404 Not Found", format!(r#"{{"message":"No such container: {id}"}}"#)),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// The fake runtimes, served from a thread with its own tokio runtime; stopped on drop.
struct FakeRuntimes {
    dir: tempfile::TempDir,
    cri_calls: Arc<AtomicU64>,
    cri_cancel: CancellationToken,
    docker_cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRuntimes {
    fn start(pod_container: &str, docker_containers: HashMap<String, (String, String)>) -> FakeRuntimes {
        let dir = tempfile::Builder::new().prefix("driftwatch-hB-runtimes-").tempdir().unwrap();
        let cri_socket = dir.path().join("containerd.sock");
        let docker_socket = dir.path().join("docker.sock");
        let cri_calls = Arc::new(AtomicU64::new(0));
        let cri_cancel = CancellationToken::new();
        let docker_cancel = CancellationToken::new();
        let fake = FakeCri { container_id: pod_container.to_string(), container_status_calls: cri_calls.clone() };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (cri_cancel, docker_cancel) = (cri_cancel.clone(), docker_cancel.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
                runtime.block_on(async move {
                    // Both sockets exist before the agent starts, so it enables both sources.
                    let cri_listener = UnixListener::bind(&cri_socket).unwrap();
                    let docker_listener = UnixListener::bind(&docker_socket).unwrap();
                    ready_tx.send(()).unwrap();
                    let cri = tonic::transport::Server::builder()
                        .add_service(RuntimeServiceServer::new(fake))
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::UnixListenerStream::new(cri_listener),
                            cri_cancel.cancelled_owned(),
                        );
                    let docker = serve_docker(docker_listener, docker_containers, docker_cancel);
                    let (cri_result, ()) = tokio::join!(cri, docker);
                    cri_result.unwrap();
                });
            })
        };
        ready_rx.recv_timeout(RUN_TIMEOUT).expect("the fake runtimes did not start");
        FakeRuntimes { dir, cri_calls, cri_cancel, docker_cancel, thread: Some(thread) }
    }

    fn cri_socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn docker_socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// Stops the Docker Engine and removes its socket, as when the daemon goes down.
    fn stop_docker(&self) {
        self.docker_cancel.cancel();
        let socket = self.docker_socket();
        wait_until(RUN_TIMEOUT, || std::fs::remove_file(&socket).ok().or_else(|| (!socket.exists()).then_some(())))
            .expect("the docker socket was not removed");
    }
}

impl Drop for FakeRuntimes {
    fn drop(&mut self) {
        self.cri_cancel.cancel();
        self.docker_cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Two namespaces joined by one veth pair: `client` at 198.18.200.1 and `server` at .2.
struct VethPair {
    client: NetNs,
    server: NetNs,
}

impl VethPair {
    fn create(prefix: &str) -> VethPair {
        let client = NetNs::create(&format!("{prefix}-c")).unwrap();
        let server = NetNs::create(&format!("{prefix}-s")).unwrap();
        client
            .ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", server.name()])
            .unwrap();
        client.ip(&["addr", "add", &format!("{CLIENT_V4}/24"), "dev", "eth0"]).unwrap();
        server.ip(&["addr", "add", &format!("{SERVER_V4}/24"), "dev", "eth0"]).unwrap();
        client.ip(&["link", "set", "eth0", "up"]).unwrap();
        server.ip(&["link", "set", "eth0", "up"]).unwrap();
        VethPair { client, server }
    }
}

/// A chain of nested cgroups, removed innermost first on drop.
struct Nested(Vec<Cgroup>);

impl Nested {
    /// Creates the cgroups of the slash-separated `path` under `root`.
    fn create(root: &Cgroup, path: &str) -> Nested {
        let mut levels: Vec<Cgroup> = Vec::new();
        for part in path.split('/') {
            let parent = levels.last().unwrap_or(root);
            let child = parent.child(part).unwrap();
            levels.push(child);
        }
        Nested(levels)
    }

    fn innermost(&self) -> &Cgroup {
        self.0.last().expect("a nested cgroup has at least one level")
    }

    fn outermost(&self) -> &Cgroup {
        self.0.first().expect("a nested cgroup has at least one level")
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        while let Some(level) = self.0.pop() {
            drop(level);
        }
    }
}

fn run_to_end(netns: &NetNs, cgroup: &Cgroup, service: &Path, args: &[&str]) -> u32 {
    let mut command = Command::new(service);
    command.args(args);
    let mut process = spawn_in(Some(netns), Some(cgroup), command).unwrap();
    process.wait_success(RUN_TIMEOUT).unwrap();
    process.pid()
}

fn counter(api: std::net::SocketAddr, name: &str) -> u64 {
    let status = stream::status(api).unwrap();
    status.counters.iter().find(|counter| counter.name == name).map_or(0, |counter| counter.value)
}

/// Waits until the status counter `name` satisfies `accept` and returns its value, or returns the
/// last value read when it does not within the timeout. The agent publishes counters once a second.
fn settled_counter(api: std::net::SocketAddr, name: &str, accept: impl Fn(u64) -> bool) -> u64 {
    let mut last = 0;
    let settled = wait_until(OBSERVE_TIMEOUT, || {
        last = counter(api, name);
        accept(last).then_some(last)
    });
    settled.unwrap_or(last)
}

fn evidence_process(deviation: &Deviation) -> &ProcessInfo {
    deviation.evidence.as_ref().and_then(|evidence| evidence.process.as_ref()).expect("the deviation names a process")
}

fn evidence_peer(deviation: &Deviation) -> &ProcessInfo {
    deviation.evidence.as_ref().and_then(|evidence| evidence.peer_process.as_ref()).expect("the deviation names a peer process")
}

#[test]
fn label_selectors_attribute_pod_and_docker_containers() {
    require_root().unwrap();
    let bin = driftwatch_bin().unwrap();
    let service = demo_service_bin().unwrap();
    let suffix = unique_suffix();

    let pod_container = container_id("pod");
    let store_container = container_id("store");
    let outage_container = container_id("outage");
    let docker_containers = HashMap::from([(store_container.clone(), ("shop-store-1".to_string(), "store".to_string()))]);
    let runtimes = FakeRuntimes::start(&pod_container, docker_containers);

    let network = VethPair::create(&format!("hB{suffix}"));
    let root = Cgroup::create(&format!("hB-labels-{suffix}")).unwrap();
    let pod_slice = format!("kubepods-besteffort-pod{}.slice", POD_UID.replace('-', "_"));
    let pod_levels = Nested::create(
        &root,
        &format!("kubepods.slice/kubepods-besteffort.slice/{pod_slice}/cri-containerd-{pod_container}.scope"),
    );
    let store_levels = Nested::create(&root, &format!("system.slice/docker-{store_container}.scope"));
    let outage = store_levels.outermost().child(&format!("docker-{outage_container}.scope")).unwrap();
    let pod_cgroup = pod_levels.innermost();
    let store_cgroup = store_levels.innermost();

    let model = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(model.path(), MODEL).unwrap();
    let docker_socket = runtimes.docker_socket();
    let cri_socket = runtimes.cri_socket();
    let agent = AgentUnderTest::start_with(
        &bin,
        model.path(),
        root.path(),
        &[
            "--docker-socket",
            docker_socket.to_str().unwrap(),
            "--cri-socket",
            cri_socket.to_str().unwrap(),
        ],
    )
    .unwrap();
    let watcher = DeviationWatcher::subscribe(agent.api_addr()).unwrap();
    let mut processes: Vec<ProcessGuard> = Vec::new();

    // The store listens in its Docker container; the checkout pod's container connects to it twice.
    let mut command = Command::new(&service);
    command.args(["db", "--listen", &format!("{SERVER_V4}:5432")]);
    let store = spawn_in(Some(&network.server), Some(store_cgroup), command).unwrap();
    store.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
    let store_pid = store.pid();
    processes.push(store);
    let target = format!("{SERVER_V4}:5432");
    let first = run_to_end(&network.client, pod_cgroup, &service, &["client", "--target", &target, "--requests", "1"]);
    run_to_end(&network.client, pod_cgroup, &service, &["client", "--target", &target, "--requests", "1"]);

    let flow_id = "unexpected-flow@checkout@store@tcp/5432";
    let flow = watcher
        .wait_for(flow_id, OBSERVE_TIMEOUT, |deviation| deviation.id == flow_id)
        .unwrap_or_else(|error| panic!("{error:#}\nagent log:\n{}", agent.log()));
    assert_eq!(flow.category, Category::UnexpectedFlow as i32);
    assert_eq!(flow.source, "checkout");
    assert_eq!(flow.destination, "store");
    let client = evidence_process(&flow);
    assert_eq!(client.pid, first);
    assert_eq!(client.container_id, pod_container);
    assert_eq!(client.container_runtime, "containerd");
    assert_eq!(client.container_name, "checkout");
    assert_eq!(client.container_labels_state, ContainerLabelsState::Resolved as i32);
    assert_eq!(client.container_labels.get("io.kubernetes.container.name").map(String::as_str), Some("checkout"));
    assert_eq!(client.pod_uid, POD_UID);
    assert_eq!(client.pod_namespace, "shop");
    assert_eq!(client.pod_name, "checkout-6c9f4");
    assert_eq!(client.pod_labels.get("app").map(String::as_str), Some("checkout"));
    let server = evidence_peer(&flow);
    assert_eq!(server.pid, store_pid);
    assert_eq!(server.container_id, store_container);
    assert_eq!(server.container_runtime, "docker");
    assert_eq!(server.container_name, "shop-store-1");
    assert_eq!(server.container_labels.get("com.docker.compose.service").map(String::as_str), Some("store"));
    assert_eq!(server.pod_uid, "");

    // Both connections land on one edge between the label-selected components.
    let mut graph = Default::default();
    let edge = wait_until(OBSERVE_TIMEOUT, || {
        graph = stream::graph(agent.api_addr()).ok()?;
        graph.edges.iter().find(|edge| edge.source == "checkout" && edge.destination == "store" && edge.connections >= 2).cloned()
    })
    .unwrap_or_else(|| panic!("no checkout -> store edge with 2 connections: {graph:#?}"));
    assert_eq!(edge.port, 5432);
    assert!(!edge.declared);
    // Two processes of one container, one ContainerStatus call: the second came from the cache.
    assert_eq!(runtimes.cri_calls.load(Ordering::SeqCst), 1);
    assert_eq!(settled_counter(agent.api_addr(), "labels_found", |found| found == 2), 2);
    assert_eq!(counter(agent.api_addr(), "labels_lookup_failures"), 0);
    let held = settled_counter(agent.api_addr(), "labels_held", |held| held >= 1);
    assert!(held >= 1, "the first connection did not wait for the labels: labels_held is {held}");

    // Docker goes down. A process in a new Docker container still raises its deviation, without
    // labels, and the failed lookup is counted.
    runtimes.stop_docker();
    run_to_end(&network.client, &outage, &service, &["client", "--target", &target, "--requests", "1"]);
    let short = &outage_container[..12];
    let unknown_id = format!("unknown-component@unknown:container:{short}@store@tcp/5432");
    let unknown = watcher
        .wait_for(&unknown_id, OBSERVE_TIMEOUT, |deviation| deviation.id == unknown_id)
        .unwrap_or_else(|error| {
            panic!("{error:#}\nseen:\n{}\nagent log:\n{}", describe_all(&watcher.deviations()), agent.log())
        });
    let process = evidence_process(&unknown);
    assert_eq!(process.container_id, outage_container);
    assert_eq!(process.container_runtime, "docker");
    assert_eq!(process.container_labels_state, ContainerLabelsState::Failed as i32);
    assert!(process.container_labels.is_empty());
    assert_eq!(settled_counter(agent.api_addr(), "labels_lookup_failures", |failures| failures == 1), 1);
    assert!(agent.log().contains("label lookup failed"), "the outage is logged:\n{}", agent.log());

    drop(watcher);
    drop(processes);
    let _ = root.kill_remaining();
    drop(agent);
    drop(outage);
    drop(store_levels);
    drop(pod_levels);
    drop(root);
    drop(network);
    drop(runtimes);
}
