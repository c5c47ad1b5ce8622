//! A blocking client of the agent's gRPC API for tests and the demo: a deviation subscription
//! collected in the background, and one-shot graph and status reads.
//!
//! Tests are plain synchronous code, so each call here runs its own small tokio runtime.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use driftwatch_proto::v1::agent_service_client::AgentServiceClient;
use driftwatch_proto::v1::stream_deviations_response::Payload;
use driftwatch_proto::v1::{
    AgentStatus, Category, Deviation, GetGraphRequest, GetStatusRequest, Graph, LossNotice,
    RawEvent, Severity, StreamDeviationsRequest,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::Result;

/// How long connecting to the agent's API may take; it is on loopback and already serving.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Every deviation the agent streams, from the start of its history, collected in the background.
///
/// Drop ends the subscription.
pub struct DeviationWatcher {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<Received>,
    changed: Condvar,
}

/// One deviation as a stream delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub sequence: u64,
    /// Node that raised it, empty from an agent without a node name.
    pub node: String,
    pub deviation: Deviation,
}

/// One raw event as a stream delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEntry {
    /// The event's sequence, in the agent's numbering of events.
    pub sequence: u64,
    pub node: String,
    pub event: RawEvent,
}

#[derive(Default)]
struct Received {
    deviations: Vec<Deviation>,
    entries: Vec<StreamEntry>,
    losses: Vec<LossNotice>,
    events: Vec<EventEntry>,
    event_losses: Vec<LossNotice>,
    /// Highest sequence received, 0 before the first message.
    last_sequence: u64,
    /// Why the stream ended, once it has.
    ended: Option<String>,
}

impl DeviationWatcher {
    /// Subscribes to every deviation from sequence 0, so nothing raised before the call is missed.
    ///
    /// Returns once the subscription is accepted, or the error that prevented it.
    pub fn subscribe(api: SocketAddr) -> Result<DeviationWatcher> {
        let request = StreamDeviationsRequest {
            from_sequence: Some(0),
            ..Default::default()
        };
        DeviationWatcher::subscribe_with(api, request)
    }

    /// Subscribes with `request`, such as one with filters or a resume point.
    pub fn subscribe_with(api: SocketAddr, request: StreamDeviationsRequest) -> Result<DeviationWatcher> {
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("deviation-watcher".into())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = started_tx.send(Err(anyhow::Error::from(error)));
                            return;
                        }
                    };
                    runtime.block_on(follow(api, request, shared, started_tx, stopped));
                })?
        };
        let watcher = DeviationWatcher {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        };
        match started_rx.recv_timeout(CONNECT_TIMEOUT) {
            Ok(Ok(())) => Ok(watcher),
            Ok(Err(error)) => Err(error),
            Err(_) => anyhow::bail!(
                "subscribing to deviations at {api} timed out after {CONNECT_TIMEOUT:?}"
            ),
        }
    }

    /// Deviations received so far, in stream order; one id appears again each time the agent
    /// re-sends it with a higher count.
    pub fn deviations(&self) -> Vec<Deviation> {
        self.shared
            .state
            .lock()
            .expect("watcher lock")
            .deviations
            .clone()
    }

    /// Deviations received so far with their sequence and node, in stream order.
    pub fn entries(&self) -> Vec<StreamEntry> {
        self.shared.state.lock().expect("watcher lock").entries.clone()
    }

    /// Returns why the stream ended, or `None` while it runs.
    pub fn ended(&self) -> Option<String> {
        self.shared.state.lock().expect("watcher lock").ended.clone()
    }

    /// Loss notices received so far.
    pub fn losses(&self) -> Vec<LossNotice> {
        self.shared
            .state
            .lock()
            .expect("watcher lock")
            .losses
            .clone()
    }

    /// Raw events received so far, in stream order.
    pub fn events(&self) -> Vec<EventEntry> {
        self.shared.state.lock().expect("watcher lock").events.clone()
    }

    /// Loss notices about raw events received so far.
    pub fn event_losses(&self) -> Vec<LossNotice> {
        self.shared.state.lock().expect("watcher lock").event_losses.clone()
    }

    /// Waits until a received raw event satisfies `accept` and returns it.
    ///
    /// Fails after `timeout` or when the stream ends, listing every event received.
    pub fn wait_for_event(
        &self,
        expected: &str,
        timeout: Duration,
        accept: impl Fn(&RawEvent) -> bool,
    ) -> Result<EventEntry> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().expect("watcher lock");
        loop {
            if let Some(found) = state.events.iter().find(|entry| accept(&entry.event)) {
                return Ok(found.clone());
            }
            let now = Instant::now();
            if state.ended.is_some() || now >= deadline {
                let reason = match &state.ended {
                    Some(reason) => format!("the stream ended ({reason})"),
                    None => format!("timed out after {timeout:?}"),
                };
                let received: Vec<String> = state.events.iter().map(|entry| format!("  #{} {:?}", entry.sequence, entry.event)).collect();
                anyhow::bail!("no event matched {expected}: {reason}; received:\n{}", received.join("\n"));
            }
            state = self.shared.changed.wait_timeout(state, deadline - now).expect("watcher lock").0;
        }
    }

    /// Returns the highest sequence received so far. Once it reaches the `last_sequence` of the
    /// agent's status, the watcher has every deviation raised before that status was read.
    pub fn last_sequence(&self) -> u64 {
        self.shared
            .state
            .lock()
            .expect("watcher lock")
            .last_sequence
    }

    /// Waits until a received deviation satisfies `accept` and returns it.
    ///
    /// Fails after `timeout` or when the stream ends, listing every deviation received, so a
    /// failing test shows what the agent raised instead.
    pub fn wait_for(
        &self,
        expected: &str,
        timeout: Duration,
        accept: impl Fn(&Deviation) -> bool,
    ) -> Result<Deviation> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().expect("watcher lock");
        loop {
            if let Some(found) = state.deviations.iter().find(|deviation| accept(deviation)) {
                return Ok(found.clone());
            }
            let now = Instant::now();
            if state.ended.is_some() || now >= deadline {
                let reason = match &state.ended {
                    Some(reason) => format!("the stream ended ({reason})"),
                    None => format!("timed out after {timeout:?}"),
                };
                anyhow::bail!(
                    "no deviation matched {expected}: {reason}; received:\n{}",
                    describe_all(&state.deviations)
                );
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .expect("watcher lock")
                .0;
        }
    }
}

impl Drop for DeviationWatcher {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn follow(
    api: SocketAddr,
    request: StreamDeviationsRequest,
    shared: Arc<Shared>,
    started: std::sync::mpsc::Sender<Result<()>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let subscribed = async {
        let mut client = connect(api).await?;
        let stream = client
            .stream_deviations(request)
            .await
            .context("StreamDeviations failed")?;
        Ok::<_, anyhow::Error>(stream.into_inner())
    };
    let mut stream = match subscribed.await {
        Ok(stream) => {
            let _ = started.send(Ok(()));
            stream
        }
        Err(error) => {
            let _ = started.send(Err(error));
            return;
        }
    };

    let ended = loop {
        let message = tokio::select! {
            _ = &mut stopped => break "the watcher was dropped".to_string(),
            message = stream.message() => message,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => break "the agent closed it".to_string(),
            Err(status) => break format!("gRPC error: {status}"),
        };
        let mut state = shared.state.lock().expect("watcher lock");
        match response.payload {
            Some(Payload::Deviation(deviation)) => {
                state.last_sequence = state.last_sequence.max(response.sequence);
                state.entries.push(StreamEntry {
                    sequence: response.sequence,
                    node: response.node.clone(),
                    deviation: deviation.clone(),
                });
                state.deviations.push(deviation);
            }
            Some(Payload::Loss(loss)) => {
                state.last_sequence = state.last_sequence.max(response.sequence);
                state.losses.push(loss);
            }
            // Events count in a sequence of their own, which `last_sequence` does not follow.
            Some(Payload::Event(event)) => state.events.push(EventEntry {
                sequence: response.sequence,
                node: response.node.clone(),
                event,
            }),
            Some(Payload::EventLoss(loss)) => state.event_losses.push(loss),
            None => state.last_sequence = state.last_sequence.max(response.sequence),
        }
        shared.changed.notify_all();
    };
    shared.state.lock().expect("watcher lock").ended = Some(ended);
    shared.changed.notify_all();
}

async fn connect(api: SocketAddr) -> Result<AgentServiceClient<Channel>> {
    let endpoint = Channel::from_shared(format!("http://{api}"))?.connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("failed to connect to the agent API at {api}"))?;
    Ok(AgentServiceClient::new(channel))
}

fn block_on<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

/// Reads the agent's observed graph.
pub fn graph(api: SocketAddr) -> Result<Graph> {
    block_on(async {
        let response = connect(api)
            .await?
            .get_graph(GetGraphRequest {})
            .await
            .context("GetGraph failed")?;
        Ok(response.into_inner())
    })
}

/// Reads the agent's status: hooks, counters, the model in force.
pub fn status(api: SocketAddr) -> Result<AgentStatus> {
    block_on(async {
        let response = connect(api)
            .await?
            .get_status(GetStatusRequest {})
            .await
            .context("GetStatus failed")?;
        Ok(response.into_inner())
    })
}

/// Returns the kebab-case name of a category as deviation ids spell it, such as `unexpected-flow`.
pub fn category_name(category: i32) -> String {
    match Category::try_from(category) {
        Ok(category) => kebab(category.as_str_name().trim_start_matches("CATEGORY_")),
        Err(_) => format!("category-{category}"),
    }
}

/// Returns the lowercase name of a severity, such as `high`.
pub fn severity_name(severity: i32) -> String {
    match Severity::try_from(severity) {
        Ok(severity) => kebab(severity.as_str_name().trim_start_matches("SEVERITY_")),
        Err(_) => format!("severity-{severity}"),
    }
}

fn kebab(screaming: &str) -> String {
    screaming.to_ascii_lowercase().replace('_', "-")
}

/// Returns the pid and executable of the process in a deviation's evidence, when it has one.
pub fn process_of(deviation: &Deviation) -> Option<(u32, &str)> {
    let process = deviation.evidence.as_ref()?.process.as_ref()?;
    Some((process.pid, process.exe.as_str()))
}

/// Formats one line per deviation (severity, id, process and endpoints) for failure messages.
pub fn describe_all(deviations: &[Deviation]) -> String {
    if deviations.is_empty() {
        return "  (none)".to_string();
    }
    deviations
        .iter()
        .map(|deviation| format!("  {}", describe(deviation)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Formats a deviation on one line: severity, id, process and endpoints.
pub fn describe(deviation: &Deviation) -> String {
    let mut line = format!("[{}] {}", severity_name(deviation.severity), deviation.id);
    if let Some((pid, exe)) = process_of(deviation) {
        line.push_str(&format!(" pid={pid} exe={exe}"));
    }
    if let Some(evidence) = &deviation.evidence {
        if !evidence.local_addr.is_empty() {
            line.push_str(&format!(" local={}", evidence.local_addr));
        }
        if !evidence.remote_addr.is_empty() {
            line.push_str(&format!(" remote={}", evidence.remote_addr));
        }
    }
    line.push_str(&format!(" count={}", deviation.count));
    line
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use driftwatch_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
    use driftwatch_proto::v1::{Edge, StreamDeviationsResponse};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tonic::{Request, Response, Status};

    use super::*;

    type Message = Result<StreamDeviationsResponse, Status>;

    /// An agent API that streams whatever the test sends and records the subscription request.
    struct FakeAgent {
        stream: Mutex<Option<mpsc::Receiver<Message>>>,
        requests: Arc<Mutex<Vec<StreamDeviationsRequest>>>,
    }

    #[tonic::async_trait]
    impl AgentService for FakeAgent {
        type StreamDeviationsStream = ReceiverStream<Message>;

        async fn stream_deviations(
            &self,
            request: Request<StreamDeviationsRequest>,
        ) -> Result<Response<Self::StreamDeviationsStream>, Status> {
            self.requests.lock().unwrap().push(request.into_inner());
            let receiver = self
                .stream
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| Status::unavailable("one stream only"))?;
            Ok(Response::new(ReceiverStream::new(receiver)))
        }

        async fn get_graph(&self, _: Request<GetGraphRequest>) -> Result<Response<Graph>, Status> {
            let edge = Edge {
                source: "web".into(),
                destination: "db".into(),
                port: 5432,
                connections: 3,
                ..Default::default()
            };
            Ok(Response::new(Graph {
                edges: vec![edge],
                ..Default::default()
            }))
        }

        async fn get_status(
            &self,
            _: Request<GetStatusRequest>,
        ) -> Result<Response<AgentStatus>, Status> {
            Ok(Response::new(AgentStatus {
                last_sequence: 7,
                ..Default::default()
            }))
        }

        async fn reload_model(
            &self,
            _: Request<driftwatch_proto::v1::ReloadModelRequest>,
        ) -> Result<Response<driftwatch_proto::v1::ReloadModelResponse>, Status> {
            Err(Status::unimplemented("the fake agent has no model"))
        }
    }

    struct Served {
        api: SocketAddr,
        sender: Option<mpsc::Sender<Message>>,
        requests: Arc<Mutex<Vec<StreamDeviationsRequest>>>,
        _runtime: tokio::runtime::Runtime,
    }

    fn serve_fake() -> Served {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (sender, receiver) = mpsc::channel(16);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let fake = FakeAgent {
            stream: Mutex::new(Some(receiver)),
            requests: Arc::clone(&requests),
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let api = listener.local_addr().unwrap();
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Served {
            api,
            sender: Some(sender),
            requests,
            _runtime: runtime,
        }
    }

    fn deviation(sequence: u64, id: &str) -> Message {
        let deviation = Deviation {
            id: id.into(),
            count: 1,
            ..Default::default()
        };
        Ok(StreamDeviationsResponse {
            payload: Some(Payload::Deviation(deviation)),
            sequence,
            node: String::new(),
        })
    }

    #[test]
    fn watcher_replays_from_start_and_waits_for_match() {
        let served = serve_fake();
        let sender = served.sender.as_ref().unwrap();
        sender.blocking_send(deviation(1, "first")).unwrap();

        let watcher = DeviationWatcher::subscribe(served.api).unwrap();
        let later = sender.clone();
        let sending = thread::spawn(move || later.blocking_send(deviation(2, "second")).unwrap());
        let found = watcher
            .wait_for("second", Duration::from_secs(10), |d| d.id == "second")
            .unwrap();
        sending.join().unwrap();

        assert_eq!(found.id, "second");
        let ids: Vec<String> = watcher.deviations().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["first", "second"]);
        assert_eq!(watcher.last_sequence(), 2);
        let requests = served.requests.lock().unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            requests[0].from_sequence,
            Some(0),
            "the watcher must replay the whole history"
        );
    }

    #[test]
    fn watcher_fails_fast_when_stream_ends() {
        let mut served = serve_fake();
        let sender = served.sender.take().unwrap();
        sender.blocking_send(deviation(1, "only")).unwrap();
        drop(sender);

        let watcher = DeviationWatcher::subscribe(served.api).unwrap();
        let started = Instant::now();
        let error = watcher
            .wait_for("never", Duration::from_secs(30), |_| false)
            .unwrap_err()
            .to_string();

        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited {:?} after the stream ended",
            started.elapsed()
        );
        assert!(error.contains("the stream ended"), "{error}");
        assert!(
            error.contains("only"),
            "the error must list what was received: {error}"
        );
    }

    #[test]
    fn graph_and_status_read_the_api() {
        let served = serve_fake();

        let graph = graph(served.api).unwrap();
        let status = status(served.api).unwrap();

        assert_eq!(graph.edges.len(), 1);
        assert_eq!(graph.edges[0].destination, "db");
        assert_eq!(status.last_sequence, 7);
    }

    #[test]
    fn subscribe_fails_without_agent() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();

        let error = DeviationWatcher::subscribe(closed)
            .err()
            .expect("subscribing to a closed port must fail");

        assert!(
            format!("{error:#}").contains(&closed.to_string()),
            "{error:#}"
        );
    }
}
