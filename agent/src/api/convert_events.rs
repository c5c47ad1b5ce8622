//! Conversions of raw events and event kinds to and from the driftwatch.v1 messages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use driftwatch_model::observation::Protocol;
use driftwatch_proto::v1 as pb;

use super::convert::{loss_to_proto, process_from_proto, process_to_proto, ConvertError};
use crate::events::{EventDetail, EventKind, EventMessage, Placement, RawEvent, SocketDetail};

pub fn event_kind_to_proto(kind: EventKind) -> pb::EventKind {
    match kind {
        EventKind::ProcessExec => pb::EventKind::ProcessExec,
        EventKind::ProcessFork => pb::EventKind::ProcessFork,
        EventKind::ProcessExit => pb::EventKind::ProcessExit,
        EventKind::TcpConnect => pb::EventKind::TcpConnect,
        EventKind::TcpEstablished => pb::EventKind::TcpEstablished,
        EventKind::TcpConnectFailed => pb::EventKind::TcpConnectFailed,
        EventKind::TcpAccept => pb::EventKind::TcpAccept,
        EventKind::TcpListen => pb::EventKind::TcpListen,
        EventKind::TcpClose => pb::EventKind::TcpClose,
        EventKind::UdpFlow => pb::EventKind::UdpFlow,
        EventKind::DnsAnswer => pb::EventKind::DnsAnswer,
        EventKind::UdpListen => pb::EventKind::UdpListen,
    }
}

/// Converts an `EventKind` value; unspecified and unknown values are errors.
pub fn event_kind_from_proto(value: i32) -> Result<EventKind, ConvertError> {
    let unknown = ConvertError::UnknownEnumValue { field: "event_kind", value };
    let kind = pb::EventKind::try_from(value).map_err(|_| unknown.clone())?;
    EventKind::ALL
        .into_iter()
        .find(|known| event_kind_to_proto(*known) == kind)
        .ok_or(unknown)
}

pub fn raw_event_to_proto(event: &RawEvent) -> pb::RawEvent {
    let mut message = pb::RawEvent {
        kind: event_kind_to_proto(event.kind) as i32,
        time: Some(event.time.into()),
        process: event.process.as_deref().map(process_to_proto),
        component: event.placement.component.clone(),
        zone: event.placement.zone.clone(),
        ..Default::default()
    };
    match &event.detail {
        EventDetail::Exec => {}
        EventDetail::Fork { child_pid } => message.child_pid = *child_pid,
        EventDetail::Exit { exit_code } => message.exit_code = *exit_code,
        EventDetail::Socket(socket) => {
            message.protocol = match socket.protocol {
                Protocol::Tcp => pb::Protocol::Tcp,
                Protocol::Udp => pb::Protocol::Udp,
            } as i32;
            message.local_addr = socket.local.to_string();
            if !socket.remote.ip().is_unspecified() || socket.remote.port() != 0 {
                message.remote_addr = socket.remote.to_string();
            }
            message.netns = socket.netns;
            message.bytes_sent = socket.bytes_sent;
            message.bytes_received = socket.bytes_received;
            message.error = socket.error;
            message.remote_name = socket.remote_name.clone();
            message.remote_component = socket.remote_placement.component.clone();
            message.remote_zone = socket.remote_placement.zone.clone();
            message.is_reply = socket.is_reply;
            message.received = socket.received;
        }
        EventDetail::DnsAnswer { name, addresses, server } => {
            message.dns_name = name.clone();
            message.dns_addresses = addresses.iter().map(ToString::to_string).collect();
            message.dns_server = server.to_string();
        }
    }
    message
}

pub fn event_message_to_proto(message: &EventMessage) -> pb::StreamDeviationsResponse {
    use pb::stream_deviations_response::Payload;

    let (payload, node) = match message {
        EventMessage::Event { event, node, .. } => (Payload::Event(raw_event_to_proto(event)), node.to_string()),
        EventMessage::Loss(notice) => (Payload::EventLoss(loss_to_proto(notice)), String::new()),
    };
    pb::StreamDeviationsResponse {
        sequence: message.sequence(),
        payload: Some(payload),
        node,
    }
}

/// Converts a streamed event back into the agent's type, as `driftwatch watch` does to print it.
///
/// # Errors
///
/// A [`ConvertError`] for an unknown kind, a missing or invalid time, or an address that does not
/// parse.
pub fn raw_event_from_proto(event: pb::RawEvent) -> Result<RawEvent, ConvertError> {
    let kind = event_kind_from_proto(event.kind)?;
    let time = event.time.ok_or(ConvertError::MissingField("time"))?;
    let time = SystemTime::try_from(time).map_err(|err| ConvertError::InvalidTimestamp {
        field: "time",
        reason: err.to_string(),
    })?;
    let detail = match kind {
        EventKind::ProcessExec => EventDetail::Exec,
        EventKind::ProcessFork => EventDetail::Fork { child_pid: event.child_pid },
        EventKind::ProcessExit => EventDetail::Exit { exit_code: event.exit_code },
        EventKind::DnsAnswer => EventDetail::DnsAnswer {
            name: event.dns_name,
            addresses: event
                .dns_addresses
                .iter()
                .map(|text| {
                    text.parse().map_err(|_| ConvertError::InvalidAddress {
                        field: "dns_addresses",
                        value: text.clone(),
                    })
                })
                .collect::<Result<_, _>>()?,
            server: socket_address("dns_server", &event.dns_server)?,
        },
        _ => EventDetail::Socket(SocketDetail {
            protocol: match pb::Protocol::try_from(event.protocol) {
                Ok(pb::Protocol::Udp) => Protocol::Udp,
                Ok(pb::Protocol::Tcp) => Protocol::Tcp,
                _ => return Err(ConvertError::UnknownEnumValue { field: "protocol", value: event.protocol }),
            },
            local: socket_address("local_addr", &event.local_addr)?,
            remote: if event.remote_addr.is_empty() {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                socket_address("remote_addr", &event.remote_addr)?
            },
            netns: event.netns,
            bytes_sent: event.bytes_sent,
            bytes_received: event.bytes_received,
            error: event.error,
            remote_name: event.remote_name,
            remote_placement: Placement { component: event.remote_component, zone: event.remote_zone },
            is_reply: event.is_reply,
            received: event.received,
        }),
    };
    Ok(RawEvent {
        kind,
        time,
        process: event.process.map(|process| Arc::new(process_from_proto(process))),
        placement: Placement { component: event.component, zone: event.zone },
        detail,
    })
}

fn socket_address(field: &'static str, text: &str) -> Result<SocketAddr, ConvertError> {
    text.parse().map_err(|_| ConvertError::InvalidAddress { field, value: text.to_owned() })
}
