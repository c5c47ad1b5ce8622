//! The tonic `CollectorService`: one task per agent push stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use driftwatch_proto::v1 as pb;
use pb::collector_service_server::CollectorService;
use pb::push_request::Payload;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{Collector, StreamId};
use crate::api::convert::deviation_from_proto;
use crate::fleet::convert::snapshot_from_proto;

/// How often a stream acknowledges what it stored since the last acknowledgement.
const ACK_INTERVAL: Duration = Duration::from_millis(100);
/// Deviations stored before an acknowledgement goes out without waiting for the interval.
const ACK_EVERY: u64 = 256;

pub(super) struct CollectorApi {
    pub collector: Arc<Collector>,
    pub shutdown: CancellationToken,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::PushAck, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl CollectorService for CollectorApi {
    type PushStream = AckStream;

    async fn push(&self, request: Request<Streaming<pb::PushRequest>>) -> Result<Response<AckStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the push stream ended before its NodeHello"))?;
        let Some(Payload::Hello(hello)) = first.payload else {
            return Err(Status::invalid_argument(
                "the first message of a push stream must be a NodeHello",
            ));
        };
        let (stream, resume) = self.collector.open_stream(&hello.node, hello.run_id, &hello.version)?;

        let (acks, outbound) = mpsc::channel(16);
        // The channel is empty, so this cannot wait.
        let _ = acks.send(Ok(pb::PushAck { acknowledged_sequence: resume })).await;
        tokio::spawn(receive_pushes(
            Arc::clone(&self.collector),
            stream,
            resume,
            inbound,
            acks,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}

/// Stores one agent's messages until its stream ends, acknowledging in batches.
async fn receive_pushes(
    collector: Arc<Collector>,
    stream: StreamId,
    resume: u64,
    mut inbound: Streaming<pb::PushRequest>,
    acks: mpsc::Sender<Result<pb::PushAck, Status>>,
    shutdown: CancellationToken,
) {
    let mut acknowledged = resume;
    let mut sent = resume;
    let mut ticker = tokio::time::interval(ACK_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            message = inbound.message() => {
                let request = match message {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(node = %stream.node, %status, "push stream failed");
                        break;
                    }
                };
                match handle(&collector, &stream, request) {
                    Ok(Some(sequence)) => acknowledged = sequence,
                    Ok(None) => {}
                    Err(status) => {
                        let _ = acks.send(Err(status)).await;
                        break;
                    }
                }
                if acknowledged >= sent + ACK_EVERY {
                    sent = acknowledged;
                    if acks.send(Ok(pb::PushAck { acknowledged_sequence: sent })).await.is_err() {
                        break;
                    }
                }
            }
            _ = ticker.tick() => {
                if acknowledged > sent {
                    sent = acknowledged;
                    if acks.send(Ok(pb::PushAck { acknowledged_sequence: sent })).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    collector.close_stream(&stream);
}

/// Applies one message; returns the node's acknowledged sequence when it moved.
fn handle(collector: &Collector, stream: &StreamId, request: pb::PushRequest) -> Result<Option<u64>, Status> {
    match request.payload {
        Some(Payload::Deviation(pushed)) => {
            let sequence = pushed.sequence;
            let deviation = pushed
                .deviation
                .ok_or(crate::api::convert::ConvertError::MissingField("deviation"))
                .and_then(deviation_from_proto);
            match deviation {
                Ok(deviation) => collector.accept_deviation(stream, sequence, deviation).map(Some),
                Err(error) => {
                    tracing::error!(node = %stream.node, sequence, %error, "dropping a deviation this collector cannot read; it is recorded as lost");
                    collector.reject_invalid(stream, sequence).map(Some)
                }
            }
        }
        Some(Payload::Gap(gap)) => {
            if gap.first_sequence == 0 || gap.first_sequence > gap.last_sequence {
                return Err(Status::invalid_argument(format!(
                    "gap {}..{} is not a range of agent sequences",
                    gap.first_sequence, gap.last_sequence
                )));
            }
            collector.accept_gap(stream, gap.first_sequence, gap.last_sequence).map(Some)
        }
        Some(Payload::Snapshot(snapshot)) => {
            let unacknowledged = snapshot.unacknowledged;
            let host = snapshot_from_proto(&stream.node, snapshot)
                .map_err(|err| Status::invalid_argument(format!("snapshot: {err}")))?;
            collector.accept_snapshot(stream, host, unacknowledged)?;
            Ok(None)
        }
        Some(Payload::Hello(_)) => Err(Status::invalid_argument(
            "NodeHello may only be the first message of a push stream",
        )),
        None => Err(Status::invalid_argument("push message without a payload")),
    }
}
