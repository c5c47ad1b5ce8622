//! The page's server-sent event stream and the graph feed behind it.
//!
//! A stream opens with the current graph, replays deviations and then follows live ones. Its
//! events are:
//!
//! - `graph`: the [`Topology`] with a `version`, sent on connect and whenever it changes;
//! - `deviation`: one deviation, with its sequence number as the event id;
//! - `loss`: a range of sequences the page will never receive (a slow page, an evicted history),
//!   with the last one as the event id;
//! - `reset`: the requested resume point is past the agent's next sequence, as after an agent
//!   restart. The page drops what it shows and receives a fresh replay.
//!
//! A page resumes with `?from=SEQUENCE` or the `Last-Event-ID` header that browsers send on their
//! own reconnects; the header names the last id received, so the stream starts one past it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use driftwatch_model::deviation::{Category, Deviation, Severity, Stride};
use driftwatch_model::observation::{ProcessInfo, Protocol};
use serde::Serialize;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::topology::{unix_millis, Topology, TopologyLimits};
use super::{LiveSource, LiveView};
use crate::api::hub::{DeviationFilter, HubMessage, LossReason, SubscribeError, Subscription};

/// One version of the graph, serialized once and shared by every open page.
#[derive(Debug)]
pub struct GraphDocument {
    /// Increases by one each time the topology changes; 0 before the first build.
    pub version: u64,
    /// The `graph` event's data: the topology with its version.
    pub json: Arc<str>,
    topology: Option<Topology>,
}

#[derive(Serialize)]
struct GraphJson<'a> {
    version: u64,
    #[serde(flatten)]
    topology: &'a Topology,
}

/// Builds the topology from a [`LiveSource`] and notifies open pages when it changes.
pub struct GraphFeed {
    source: Arc<dyn LiveSource>,
    limits: TopologyLimits,
    sender: watch::Sender<Arc<GraphDocument>>,
}

impl GraphFeed {
    pub fn new(source: Arc<dyn LiveSource>, limits: TopologyLimits) -> GraphFeed {
        let empty = GraphDocument { version: 0, json: Arc::from("{}"), topology: None };
        let (sender, _) = watch::channel(Arc::new(empty));
        GraphFeed { source, limits, sender }
    }

    /// Builds the topology now, publishes it when it differs from the last one, and returns the
    /// document in force afterwards.
    ///
    /// # Errors
    ///
    /// A message when the build panicked.
    pub async fn refresh(&self) -> Result<Arc<GraphDocument>, String> {
        let source = Arc::clone(&self.source);
        let limits = self.limits;
        // A large graph takes a while to copy, so it does not run on a runtime worker.
        let topology = tokio::task::spawn_blocking(move || {
            Topology::build(&source.declared(), &source.graph(), limits).with_hosts(source.hosts())
        })
            .await
            .map_err(|error| format!("failed to build the graph for the live view: {error}"))?;

        let mut current = None;
        self.sender.send_if_modified(|document| {
            if document.topology.as_ref() == Some(&topology) {
                current = Some(Arc::clone(document));
                return false;
            }
            let version = document.version + 1;
            let json = serde_json::to_string(&GraphJson { version, topology: &topology })
                .expect("a topology has only string keys and finite numbers");
            *document = Arc::new(GraphDocument { version, json: Arc::from(json), topology: Some(topology) });
            current = Some(Arc::clone(document));
            true
        });
        Ok(current.expect("send_if_modified always calls the closure"))
    }

    fn subscribe(&self) -> watch::Receiver<Arc<GraphDocument>> {
        self.sender.subscribe()
    }

    /// Compares the graph every `interval` while at least one page is open, until `shutdown`.
    pub(super) async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if self.sender.receiver_count() == 0 {
                continue;
            }
            if let Err(error) = self.refresh().await {
                tracing::warn!(%error, "live view graph not refreshed; pages keep the previous one");
            }
        }
    }
}

/// The first deviation a stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// The most recent deviations, up to [`super::LiveViewConfig::initial_replay`].
    Recent,
    /// Every retained deviation from this sequence on.
    From(u64),
}

/// Reads the resume point from the `Last-Event-ID` header, else from the `from` query parameter.
fn resume_point(headers: &HeaderMap, uri: &Uri) -> Result<Resume, String> {
    if let Some(value) = headers.get("last-event-id") {
        let text = value.to_str().unwrap_or("");
        let last: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("invalid Last-Event-ID header {value:?}: expected a deviation sequence number"))?;
        return Ok(Resume::From(last.saturating_add(1)));
    }
    let query = uri.query().unwrap_or("");
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("from=") {
            let from: u64 = value
                .parse()
                .map_err(|_| format!("invalid from={value:?} in the query: expected a deviation sequence number"))?;
            return Ok(Resume::From(from));
        }
    }
    Ok(Resume::Recent)
}

/// Handles `GET /api/events`.
pub(super) async fn handle(view: &Arc<LiveView>, headers: &HeaderMap, uri: &Uri, shutdown: CancellationToken) -> Response {
    let resume = match resume_point(headers, uri) {
        Ok(resume) => resume,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    // Subscribed before the build, so a change published in between is not missed. At worst the
    // page draws one version twice.
    let graph_updates = view.feed.subscribe();
    let document = match view.feed.refresh().await {
        Ok(document) => document,
        Err(message) => return (StatusCode::INTERNAL_SERVER_ERROR, message).into_response(),
    };

    let mut prelude = vec![graph_event(&document)];
    let subscription = match subscribe(view, resume) {
        Ok(subscription) => subscription,
        Err(SubscribeError::FromSequenceAhead { requested, next }) => {
            tracing::info!(requested, next, "live view page resumed past the next sequence; sending a reset");
            prelude.push(Event::default().event("reset").data(format!(r#"{{"requested":{requested},"next":{next}}}"#)));
            match subscribe(view, Resume::Recent) {
                Ok(subscription) => subscription,
                Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
            }
        }
    };
    tracing::debug!(?resume, "live view page connected");

    let first_version = document.version;
    let graphs = WatchStream::from_changes(graph_updates)
        .filter(move |document| document.version > first_version)
        .map(|document| graph_event(&document));
    let deviations = subscription.map(|message| hub_event(&message));
    let stream = tokio_stream::iter(prelude).chain(deviations.merge(graphs)).map(Ok::<Event, Infallible>);
    // The server's graceful shutdown waits for open responses, and this one never ends on its own.
    let stream = futures_util::StreamExt::take_until(stream, shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn subscribe(view: &LiveView, resume: Resume) -> Result<Subscription, SubscribeError> {
    let from = match resume {
        Resume::From(from) => from,
        Resume::Recent => {
            let counters = view.hub.counters();
            let recent = counters.last_sequence.saturating_sub(view.config.initial_replay.saturating_sub(1));
            recent.max(counters.oldest_retained_sequence).max(1)
        }
    };
    view.hub.subscribe(DeviationFilter::default(), Some(from))
}

fn graph_event(document: &GraphDocument) -> Event {
    Event::default().event("graph").data(&*document.json)
}

fn hub_event(message: &HubMessage) -> Event {
    match message {
        HubMessage::Deviation { sequence, node, deviation } => {
            let json = serde_json::to_string(&DeviationJson::new(*sequence, node, deviation))
                .expect("a deviation has only string keys and finite numbers");
            Event::default().event("deviation").id(sequence.to_string()).data(json)
        }
        HubMessage::Loss(notice) => {
            let reason = match notice.reason {
                LossReason::SubscriberLagged => "subscriber-lagged",
                LossReason::HistoryEvicted => "history-evicted",
            };
            let json = format!(
                r#"{{"first_sequence":{},"last_sequence":{},"missed":{},"reason":"{reason}"}}"#,
                notice.first_sequence,
                notice.last_sequence,
                notice.missed()
            );
            Event::default().event("loss").id(notice.last_sequence.to_string()).data(json)
        }
        // Only a collector's hub carries node gaps: deviations a node lost before they reached it.
        HubMessage::NodeGap { sequence, gap } => {
            let json = format!(
                r#"{{"first_sequence":{},"last_sequence":{},"missed":{},"reason":"node-buffer-overflow"}}"#,
                gap.first_sequence,
                gap.last_sequence,
                gap.missed()
            );
            Event::default().event("loss").id(sequence.to_string()).data(json)
        }
    }
}

/// A deviation as the page reads it: times in Unix milliseconds, addresses as text.
#[derive(Serialize)]
struct DeviationJson<'a> {
    sequence: u64,
    /// Fleet node that raised it.
    node: &'a str,
    id: &'a str,
    category: Category,
    severity: Severity,
    stride: Stride,
    summary: &'a str,
    source: &'a str,
    destination: &'a str,
    protocol: Option<Protocol>,
    port: Option<u16>,
    process: Option<&'a ProcessInfo>,
    peer_process: Option<&'a ProcessInfo>,
    local_addr: Option<String>,
    remote_addr: Option<String>,
    source_zone: Option<&'a str>,
    destination_zone: Option<&'a str>,
    first_seen_ms: u64,
    last_seen_ms: u64,
    count: u64,
    resolution: &'a str,
}

impl<'a> DeviationJson<'a> {
    fn new(sequence: u64, node: &'a str, deviation: &'a Deviation) -> DeviationJson<'a> {
        let evidence = &deviation.evidence;
        DeviationJson {
            sequence,
            node,
            id: &deviation.id,
            category: deviation.category,
            severity: deviation.severity,
            stride: deviation.stride,
            summary: &deviation.summary,
            source: &deviation.source,
            destination: &deviation.destination,
            protocol: deviation.protocol,
            port: deviation.port,
            process: evidence.process.as_ref(),
            peer_process: evidence.peer_process.as_ref(),
            local_addr: evidence.local_addr.map(|addr| addr.to_string()),
            remote_addr: evidence.remote_addr.map(|addr| addr.to_string()),
            source_zone: evidence.source_zone.as_deref(),
            destination_zone: evidence.destination_zone.as_deref(),
            first_seen_ms: unix_millis(deviation.first_seen),
            last_seen_ms: unix_millis(deviation.last_seen),
            count: deviation.count,
            resolution: &deviation.resolution,
        }
    }
}
