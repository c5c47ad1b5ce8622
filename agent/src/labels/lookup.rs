//! The lookup task: asks the label sources about containers, off the pipeline's task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{runtime_name, ContainerMetadata, LabelSource};
use crate::state::container::Runtime;

/// Bounds of the lookup task.
#[derive(Debug, Clone)]
pub struct LookupConfig {
    /// How long one lookup (all calls to one runtime for one container) may take.
    pub timeout: Duration,
    /// Lookups running at once; further requests wait in the request channel.
    pub max_in_flight: usize,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig { timeout: Duration::from_secs(2), max_in_flight: 8 }
    }
}

/// A container whose labels the pipeline needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequest {
    pub container_id: String,
    pub runtime: Runtime,
}

/// The outcome of one lookup, sent back to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelReply {
    pub container_id: String,
    pub outcome: LookupOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupOutcome {
    Found(ContainerMetadata),
    /// The source serves the runtime but does not know the container.
    NotFound,
    /// The source could not answer; the message names the source and the cause.
    Failed(String),
    /// No configured source serves the container's runtime.
    NoSource,
}

/// Runs lookups for `requests` and sends each outcome to `replies`, until `cancel` fires or the
/// request channel closes.
///
/// A source's first failure after a success is logged at warn, later ones at debug until it
/// answers again, so an outage is one line and its end another.
pub async fn run_lookups(
    sources: Vec<Arc<dyn LabelSource>>,
    config: LookupConfig,
    mut requests: mpsc::Receiver<LabelRequest>,
    replies: mpsc::Sender<LabelReply>,
    cancel: CancellationToken,
) {
    let max_in_flight = config.max_in_flight.max(1);
    let mut in_flight: JoinSet<(&'static str, LabelReply)> = JoinSet::new();
    let mut failing: HashMap<&'static str, bool> = HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                let Ok((source, reply)) = done else { continue };
                log_health(&mut failing, source, &reply);
                if replies.send(reply).await.is_err() {
                    break;
                }
            }
            request = requests.recv(), if in_flight.len() < max_in_flight => {
                let Some(request) = request else { break };
                let source = sources.iter().find(|source| source.serves(request.runtime)).cloned();
                let timeout = config.timeout;
                in_flight.spawn(async move { lookup_one(source, request, timeout).await });
            }
        }
    }
    in_flight.abort_all();
}

async fn lookup_one(
    source: Option<Arc<dyn LabelSource>>,
    request: LabelRequest,
    timeout: Duration,
) -> (&'static str, LabelReply) {
    let container_id = request.container_id;
    let Some(source) = source else {
        let reply = LabelReply { container_id, outcome: LookupOutcome::NoSource };
        return ("none", reply);
    };
    let name = source.name();
    let outcome = match tokio::time::timeout(timeout, source.lookup(&container_id)).await {
        Ok(Ok(Some(metadata))) => LookupOutcome::Found(metadata),
        Ok(Ok(None)) => LookupOutcome::NotFound,
        Ok(Err(error)) => LookupOutcome::Failed(format!("label source {name}: {error}")),
        Err(_) => LookupOutcome::Failed(format!(
            "label source {name} did not answer for a {} container within {timeout:?}",
            runtime_name(request.runtime)
        )),
    };
    tracing::trace!(source = name, container = %container_id, ?outcome, "label lookup");
    (name, LabelReply { container_id, outcome })
}

fn log_health(failing: &mut HashMap<&'static str, bool>, source: &'static str, reply: &LabelReply) {
    let was_failing = failing.get(source).copied().unwrap_or(false);
    match &reply.outcome {
        LookupOutcome::Failed(error) if !was_failing => {
            failing.insert(source, true);
            tracing::warn!(
                source,
                container = %reply.container_id,
                %error,
                "label lookup failed; label selectors do not match this runtime's containers until it answers again"
            );
        }
        LookupOutcome::Failed(error) => {
            tracing::debug!(source, container = %reply.container_id, %error, "label lookup failed");
        }
        LookupOutcome::Found(_) | LookupOutcome::NotFound if was_failing => {
            failing.insert(source, false);
            tracing::info!(source, "label source responds again");
        }
        _ => {}
    }
}
