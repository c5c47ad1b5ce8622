//! Conversions between the fleet types of the model crate and the collector's messages.

use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use driftwatch_model::fleet::{HostGraph, NodeListener, PeerFlow, PeerRole};
use driftwatch_model::graph::GraphSnapshot;
use driftwatch_model::observation::Protocol;
use driftwatch_proto::v1 as pb;

use crate::api::convert::{graph_from_proto, graph_to_proto, ConvertError};

fn protocol_to_proto(protocol: Protocol) -> i32 {
    match protocol {
        Protocol::Tcp => pb::Protocol::Tcp as i32,
        Protocol::Udp => pb::Protocol::Udp as i32,
    }
}

fn protocol_from_proto(field: &'static str, value: i32) -> Result<Protocol, ConvertError> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        _ => Err(ConvertError::UnknownEnumValue { field, value }),
    }
}

fn port_from_proto(field: &'static str, value: u32) -> Result<u16, ConvertError> {
    u16::try_from(value).map_err(|_| ConvertError::PortOutOfRange { field, value })
}

fn time_from_proto(field: &'static str, time: Option<prost_types::Timestamp>) -> Result<SystemTime, ConvertError> {
    let time = time.ok_or(ConvertError::MissingField(field))?;
    SystemTime::try_from(time).map_err(|err| ConvertError::InvalidTimestamp {
        field,
        reason: err.to_string(),
    })
}

/// Builds the snapshot an agent pushes.
pub fn snapshot_to_proto(
    graph: &GraphSnapshot,
    peers: &[PeerFlow],
    listeners: &[NodeListener],
    addresses: &[IpAddr],
    taken_at: SystemTime,
) -> pb::NodeSnapshot {
    pb::NodeSnapshot {
        graph: Some(graph_to_proto(graph, taken_at)),
        peer_flows: peers.iter().map(peer_to_proto).collect(),
        listeners: listeners
            .iter()
            .map(|listener| pb::NodeListener {
                node: listener.node.clone(),
                addr: listener.addr.to_string(),
                protocol: protocol_to_proto(listener.protocol),
            })
            .collect(),
        addresses: addresses.iter().map(IpAddr::to_string).collect(),
        taken_at: Some(taken_at.into()),
        // The pusher fills in its backlog.
        unacknowledged: 0,
    }
}

fn peer_to_proto(peer: &PeerFlow) -> pb::PeerFlow {
    let role = match peer.role {
        PeerRole::Client => pb::PeerRole::Client,
        PeerRole::Server => pb::PeerRole::Server,
    };
    pb::PeerFlow {
        source: peer.source.clone(),
        destination: peer.destination.clone(),
        protocol: protocol_to_proto(peer.protocol),
        port: u32::from(peer.port),
        role: role as i32,
        remote_ip: peer.remote_ip.to_string(),
        connections: peer.connections,
        first_seen: Some(peer.first_seen.into()),
        last_seen: Some(peer.last_seen.into()),
    }
}

/// Reads a pushed snapshot back into what the merge takes, for the node named `host`.
///
/// # Errors
///
/// A [`ConvertError`] naming the first field that is missing, unknown or malformed.
pub fn snapshot_from_proto(host: &str, snapshot: pb::NodeSnapshot) -> Result<HostGraph, ConvertError> {
    let graph = graph_from_proto(snapshot.graph.ok_or(ConvertError::MissingField("snapshot.graph"))?)?;
    let peers = snapshot
        .peer_flows
        .into_iter()
        .map(|peer| {
            let role = match pb::PeerRole::try_from(peer.role) {
                Ok(pb::PeerRole::Client) => PeerRole::Client,
                Ok(pb::PeerRole::Server) => PeerRole::Server,
                _ => {
                    return Err(ConvertError::UnknownEnumValue {
                        field: "peer_flows.role",
                        value: peer.role,
                    })
                }
            };
            let remote_ip: IpAddr = peer.remote_ip.parse().map_err(|_| ConvertError::InvalidAddress {
                field: "peer_flows.remote_ip",
                value: peer.remote_ip.clone(),
            })?;
            Ok(PeerFlow {
                source: peer.source,
                destination: peer.destination,
                protocol: protocol_from_proto("peer_flows.protocol", peer.protocol)?,
                port: port_from_proto("peer_flows.port", peer.port)?,
                role,
                remote_ip,
                connections: peer.connections,
                first_seen: time_from_proto("peer_flows.first_seen", peer.first_seen)?,
                last_seen: time_from_proto("peer_flows.last_seen", peer.last_seen)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let listeners = snapshot
        .listeners
        .into_iter()
        .map(|listener| {
            let addr: SocketAddr = listener.addr.parse().map_err(|_| ConvertError::InvalidAddress {
                field: "listeners.addr",
                value: listener.addr.clone(),
            })?;
            Ok(NodeListener {
                node: listener.node,
                addr,
                protocol: protocol_from_proto("listeners.protocol", listener.protocol)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let addresses = snapshot
        .addresses
        .into_iter()
        .map(|text| {
            text.parse().map_err(|_| ConvertError::InvalidAddress {
                field: "addresses",
                value: text,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HostGraph {
        host: host.to_owned(),
        graph,
        peers,
        listeners,
        addresses,
    })
}
