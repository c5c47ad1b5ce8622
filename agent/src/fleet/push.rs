//! Pushing this agent's deviations and graph to a collector.
//!
//! The hub's replay history is the buffer of deviations not yet acknowledged: the pusher reads
//! from it and never copies. Each stream opens with the node's name and run id. The collector
//! replies with the last agent sequence it stored for that run, and the pusher replays from the
//! one after it. A reconnect therefore resends exactly what the collector lacks. When the history
//! evicted some of that before it could be pushed, the pusher sends the range as a gap, counts it
//! and logs it, so both sides report the loss.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use driftwatch_proto::v1 as pb;
use pb::collector_service_client::CollectorServiceClient;
use pb::push_request::Payload;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::convert::snapshot_to_proto;
use super::endpoints::EndpointTable;
use crate::api::client::connect_channel;
use crate::api::tls::ClientTls;
use crate::api::convert::deviation_to_proto;
use crate::api::hub::{DeviationHub, HubMessage, LossReason, Replay};
use super::addr::CollectorAddr;
use crate::api::{AgentView, FilterSet, ListenAddr};

/// Messages queued toward the collector before the pusher waits for the transport.
const OUTBOUND_QUEUE: usize = 256;
/// First wait before reconnecting; it doubles per failed attempt up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// How long a plaintext connect to a collector named by host may take.
const PLAINTEXT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Collector address and node identity of a pusher.
#[derive(Debug, Clone)]
pub struct PushConfig {
    pub collector: CollectorAddr,
    /// Node name, unique in the fleet.
    pub node: String,
    /// Random id of this agent process.
    pub run_id: u64,
    /// How often the graph and endpoints are sent.
    pub snapshot_interval: Duration,
    /// Addresses listeners on an unspecified IP serve.
    pub addresses: Vec<IpAddr>,
    /// Mutual TLS towards the collector; `None` connects in plaintext.
    pub tls: Option<ClientTls>,
}

/// Counters of the pusher, shown in the agent's status.
#[derive(Debug, Default)]
pub struct PushCounters {
    /// 1 while a stream is open.
    pub connected: AtomicU64,
    /// Deviations sent, resends after a reconnect included.
    pub pushed: AtomicU64,
    /// Latest agent sequence the collector acknowledged.
    pub acknowledged: AtomicU64,
    /// Deviations evicted from the buffer before they were pushed.
    pub lost: AtomicU64,
    /// Streams that ended or failed to open.
    pub disconnects: AtomicU64,
    /// Streams the collector rejected because another agent had one open under the same node name.
    pub node_conflicts: AtomicU64,
    pub snapshots: AtomicU64,
}

impl PushCounters {
    /// Returns how many of the deviations `hub` published the collector has not acknowledged.
    pub fn backlog(&self, hub: &DeviationHub) -> u64 {
        hub.counters().last_sequence.saturating_sub(self.acknowledged.load(Ordering::Relaxed))
    }
}

impl PushCounters {
    /// Lists the counters as (name, value) for the status call.
    pub fn named(&self) -> Vec<(String, u64)> {
        [
            ("collector_connected", &self.connected),
            ("collector_pushed", &self.pushed),
            ("collector_acknowledged_sequence", &self.acknowledged),
            ("collector_buffer_lost", &self.lost),
            ("collector_disconnects", &self.disconnects),
            ("collector_node_conflicts", &self.node_conflicts),
            ("collector_snapshots", &self.snapshots),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.load(Ordering::Relaxed)))
        .collect()
    }
}

/// Agent state the pusher reads.
pub struct PushSource {
    pub hub: Arc<DeviationHub>,
    pub view: Arc<dyn AgentView>,
    pub endpoints: Arc<Mutex<EndpointTable>>,
}

/// Cause of a push stream's end.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("failed to connect: {}", crate::errors::chain_text(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("the collector rejected the stream ({:?}): {}", .0.code(), .0.message())]
    Rejected(tonic::Status),
    #[error("the stream failed ({:?}): {}", .0.code(), .0.message())]
    Stream(tonic::Status),
    #[error("the collector closed the stream")]
    Closed,
}

/// Pushes to the collector until `cancel` fires, reconnecting with a growing delay after each
/// failure; the agent keeps working while the collector is unreachable.
pub async fn run_pusher(
    config: PushConfig,
    source: PushSource,
    counters: Arc<PushCounters>,
    cancel: CancellationToken,
) {
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        let pushed_before = counters.pushed.load(Ordering::Relaxed);
        let result = push_session(&config, &source, &counters, &cancel).await;
        counters.connected.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => return,
            Err(SessionError::Rejected(status)) if status.code() == tonic::Code::AlreadyExists => {
                counters.disconnects.fetch_add(1, Ordering::Relaxed);
                counters.node_conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    collector = %config.collector,
                    node = %config.node,
                    run_id = config.run_id,
                    reason = status.message(),
                    retry_in = ?delay,
                    "the collector rejected this agent's push stream because another agent pushes under the same node name; deviations stay buffered and this agent takes the node over once the other stream ends"
                );
            }
            Err(error) => {
                counters.disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    collector = %config.collector,
                    %error,
                    retry_in = ?delay,
                    "push to the collector stopped; deviations stay buffered in the replay history until it returns"
                );
            }
        }
        // A stream that carried deviations was healthy, so the next attempt starts quickly.
        if counters.pushed.load(Ordering::Relaxed) > pushed_before {
            delay = FIRST_RETRY_DELAY;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Opens the channel to the collector, with TLS when the agent has a client certificate for it.
async fn collector_channel(config: &PushConfig) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    match (&config.tls, &config.collector) {
        (Some(tls), CollectorAddr::Addr(ListenAddr::Tcp(_)) | CollectorAddr::Host { .. }) => {
            tls.channel(&config.collector.to_string()).await
        }
        (_, CollectorAddr::Addr(addr)) => connect_channel(addr).await,
        // Only `localhost` may be dialled by name without TLS.
        (None, CollectorAddr::Host { host, port }) => {
            tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))?
                .connect_timeout(PLAINTEXT_CONNECT_TIMEOUT)
                .connect()
                .await
        }
    }
}

async fn push_session(
    config: &PushConfig,
    source: &PushSource,
    counters: &PushCounters,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let channel = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        channel = collector_channel(config) => channel?,
    };
    let mut client = CollectorServiceClient::new(channel);
    let (outbound, queue) = mpsc::channel(OUTBOUND_QUEUE);
    let hello = pb::NodeHello {
        node: config.node.clone(),
        run_id: config.run_id,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    // The queue is empty, so this cannot wait.
    let _ = outbound.send(request(Payload::Hello(hello))).await;
    let mut acks = client
        .push(ReceiverStream::new(queue))
        .await
        .map_err(SessionError::Rejected)?
        .into_inner();
    let resume = match acks.message().await {
        Ok(Some(ack)) => ack.acknowledged_sequence,
        Ok(None) => return Err(SessionError::Closed),
        Err(status) => return Err(SessionError::Stream(status)),
    };
    counters.acknowledged.store(resume, Ordering::Relaxed);
    counters.connected.store(1, Ordering::Relaxed);
    tracing::info!(collector = %config.collector, node = %config.node, resume_after = resume, "pushing to the collector");

    let mut next = resume + 1;
    let mut subscription = subscribe_from(&source.hub, next);
    let mut snapshots = tokio::time::interval(config.snapshot_interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            message = subscription.next() => {
                let Some(message) = message else { return Ok(()) };
                match message {
                    HubMessage::Deviation { sequence, deviation, .. } => {
                        let pushed = pb::PushedDeviation { sequence, deviation: Some(deviation_to_proto(&deviation)) };
                        send(&outbound, Payload::Deviation(pushed)).await?;
                        counters.pushed.fetch_add(1, Ordering::Relaxed);
                        next = sequence + 1;
                    }
                    HubMessage::Loss(notice) if notice.reason == LossReason::SubscriberLagged => {
                        // The history may still hold what the live channel dropped.
                        subscription = subscribe_from(&source.hub, next);
                    }
                    HubMessage::Loss(notice) => {
                        tracing::error!(
                            first_sequence = notice.first_sequence,
                            last_sequence = notice.last_sequence,
                            missed = notice.missed(),
                            "deviations were evicted from the buffer before the collector acknowledged them; raise --history to buffer more"
                        );
                        counters.lost.fetch_add(notice.missed(), Ordering::Relaxed);
                        let gap = pb::PushGap { first_sequence: notice.first_sequence, last_sequence: notice.last_sequence };
                        send(&outbound, Payload::Gap(gap)).await?;
                        next = notice.last_sequence + 1;
                    }
                    HubMessage::NodeGap { .. } => {}
                }
            }
            ack = acks.message() => match ack {
                Ok(Some(ack)) => counters.acknowledged.store(ack.acknowledged_sequence, Ordering::Relaxed),
                Ok(None) => return Err(SessionError::Closed),
                Err(status) => return Err(SessionError::Stream(status)),
            },
            _ = snapshots.tick() => {
                let mut snapshot = snapshot(config, source);
                snapshot.unacknowledged = counters.backlog(&source.hub);
                send(&outbound, Payload::Snapshot(snapshot)).await?;
                counters.snapshots.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Subscribes to every deviation from agent sequence `next` on.
fn subscribe_from(hub: &DeviationHub, next: u64) -> crate::api::Subscription {
    match hub.subscribe_with(FilterSet::all(), Replay::FromSequence(next)) {
        Ok(subscription) => subscription,
        Err(error) => {
            // The collector acknowledged a sequence this run has not reached. Only a collector bug
            // or a reused run id explains that, so push what comes from now on.
            tracing::error!(%error, "the collector's resume point is ahead of this agent; pushing new deviations only");
            hub.subscribe_with(FilterSet::all(), Replay::None)
                .expect("a subscription without replay cannot fail")
        }
    }
}

fn snapshot(config: &PushConfig, source: &PushSource) -> pb::NodeSnapshot {
    let graph = source.view.graph();
    let (peers, listeners) = {
        let table = source.endpoints.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (table.peers(), table.listeners())
    };
    snapshot_to_proto(&graph, &peers, &listeners, &config.addresses, SystemTime::now())
}

fn request(payload: Payload) -> pb::PushRequest {
    pb::PushRequest {
        payload: Some(payload),
    }
}

async fn send(outbound: &mpsc::Sender<pb::PushRequest>, payload: Payload) -> Result<(), SessionError> {
    outbound
        .send(request(payload))
        .await
        .map_err(|_| SessionError::Closed)
}
