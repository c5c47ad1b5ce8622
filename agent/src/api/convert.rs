//! Conversions between the model's types and the driftwatch.v1 messages.
//!
//! Model to protobuf cannot fail. Protobuf to model can, because a message may come from a newer
//! agent (an enum value this build does not know) or from a faulty peer (an address that does not
//! parse, a missing timestamp). Clients that read deviations back into the model, such as CI mode
//! or a collector, use that direction.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::graph::{EdgeSnapshot, GraphSnapshot, NodeKind, NodeProcess, NodeSnapshot};
use driftwatch_model::observation::{ExecFacts, ProcessInfo, Protocol};
use driftwatch_proto::v1 as pb;

use super::convert_container::{container_from_proto, container_to_proto};
use super::hub::{HubCounters, HubMessage, LossNotice, LossReason};
use super::status::{ModelInfo, NodeStatus, StatusSnapshot};
use crate::reload::ReloadOutcome;
use crate::state::container::classify_cgroup;

/// Errors from converting a protobuf message into a model type.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("field {0} is missing")]
    MissingField(&'static str),
    #[error("field {field} has value {value}, which this build does not know")]
    UnknownEnumValue { field: &'static str, value: i32 },
    #[error("field {field} has invalid socket address {value:?}; expected ip:port")]
    InvalidAddress { field: &'static str, value: String },
    #[error("field {field} has invalid timestamp: {reason}")]
    InvalidTimestamp { field: &'static str, reason: String },
    #[error("field {field} has port {value}, which is above 65535")]
    PortOutOfRange { field: &'static str, value: u32 },
}

pub fn category_to_proto(category: Category) -> pb::Category {
    // The model pins its discriminants for the API, and a test checks that the names agree.
    pb::Category::try_from(category as i32).unwrap_or(pb::Category::Unspecified)
}

pub fn category_from_proto(value: i32) -> Result<Category, ConvertError> {
    Category::ALL
        .into_iter()
        .find(|category| *category as i32 == value)
        .ok_or(ConvertError::UnknownEnumValue {
            field: "category",
            value,
        })
}

pub fn severity_to_proto(severity: Severity) -> pb::Severity {
    pb::Severity::try_from(severity as i32).unwrap_or(pb::Severity::Unspecified)
}

pub fn severity_from_proto(value: i32) -> Result<Severity, ConvertError> {
    Severity::ALL
        .into_iter()
        .find(|severity| *severity as i32 == value)
        .ok_or(ConvertError::UnknownEnumValue {
            field: "severity",
            value,
        })
}

fn stride_to_proto(stride: Stride) -> pb::Stride {
    match stride {
        Stride::Spoofing => pb::Stride::Spoofing,
        Stride::Tampering => pb::Stride::Tampering,
        Stride::Repudiation => pb::Stride::Repudiation,
        Stride::InformationDisclosure => pb::Stride::InformationDisclosure,
        Stride::DenialOfService => pb::Stride::DenialOfService,
        Stride::ElevationOfPrivilege => pb::Stride::ElevationOfPrivilege,
    }
}

fn stride_from_proto(value: i32) -> Result<Stride, ConvertError> {
    let unknown = ConvertError::UnknownEnumValue {
        field: "stride",
        value,
    };
    match pb::Stride::try_from(value).map_err(|_| unknown.clone())? {
        pb::Stride::Unspecified => Err(unknown),
        pb::Stride::Spoofing => Ok(Stride::Spoofing),
        pb::Stride::Tampering => Ok(Stride::Tampering),
        pb::Stride::Repudiation => Ok(Stride::Repudiation),
        pb::Stride::InformationDisclosure => Ok(Stride::InformationDisclosure),
        pb::Stride::DenialOfService => Ok(Stride::DenialOfService),
        pb::Stride::ElevationOfPrivilege => Ok(Stride::ElevationOfPrivilege),
    }
}

fn protocol_to_proto(protocol: Option<Protocol>) -> pb::Protocol {
    match protocol {
        None => pb::Protocol::Unspecified,
        Some(Protocol::Tcp) => pb::Protocol::Tcp,
        Some(Protocol::Udp) => pb::Protocol::Udp,
    }
}

fn protocol_from_proto(field: &'static str, value: i32) -> Result<Option<Protocol>, ConvertError> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Unspecified) => Ok(None),
        Ok(pb::Protocol::Tcp) => Ok(Some(Protocol::Tcp)),
        Ok(pb::Protocol::Udp) => Ok(Some(Protocol::Udp)),
        Err(_) => Err(ConvertError::UnknownEnumValue { field, value }),
    }
}

fn node_kind_to_proto(kind: NodeKind) -> pb::NodeKind {
    match kind {
        NodeKind::Declared => pb::NodeKind::Declared,
        NodeKind::Discovered => pb::NodeKind::Discovered,
        NodeKind::External => pb::NodeKind::External,
    }
}

fn node_kind_from_proto(value: i32) -> Result<NodeKind, ConvertError> {
    match pb::NodeKind::try_from(value) {
        Ok(pb::NodeKind::Declared) => Ok(NodeKind::Declared),
        Ok(pb::NodeKind::Discovered) => Ok(NodeKind::Discovered),
        Ok(pb::NodeKind::External) => Ok(NodeKind::External),
        Ok(pb::NodeKind::Unspecified) | Err(_) => Err(ConvertError::UnknownEnumValue {
            field: "node.kind",
            value,
        }),
    }
}

fn timestamp_from_proto(
    field: &'static str,
    timestamp: Option<prost_types::Timestamp>,
) -> Result<SystemTime, ConvertError> {
    let timestamp = timestamp.ok_or(ConvertError::MissingField(field))?;
    SystemTime::try_from(timestamp).map_err(|err| ConvertError::InvalidTimestamp {
        field,
        reason: err.to_string(),
    })
}

fn address_to_proto(addr: Option<SocketAddr>) -> String {
    addr.map(|addr| addr.to_string()).unwrap_or_default()
}

fn address_from_proto(
    field: &'static str,
    text: String,
) -> Result<Option<SocketAddr>, ConvertError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| ConvertError::InvalidAddress { field, value: text })
}

fn process_refs_to_proto(refs: &[(u32, String)]) -> Vec<pb::ProcessRef> {
    refs.iter()
        .map(|(pid, exe)| pb::ProcessRef {
            pid: *pid,
            exe: exe.clone(),
        })
        .collect()
}

fn process_refs_from_proto(refs: Vec<pb::ProcessRef>) -> Vec<(u32, String)> {
    refs.into_iter()
        .map(|process| (process.pid, process.exe))
        .collect()
}

pub fn process_to_proto(process: &ProcessInfo) -> pb::ProcessInfo {
    pb::ProcessInfo {
        pid: process.pid,
        ppid: process.ppid,
        exe: process.exe.clone(),
        argv: process.argv.clone(),
        argv_truncated: process.argv_truncated,
        uid: process.uid,
        gid: process.gid,
        user: process.user.clone(),
        cgroup: process.cgroup.clone(),
        comm: process.comm.clone(),
        ancestry: process_refs_to_proto(&process.ancestry),
        fileless: process.exec.fileless,
        exe_deleted: process.exec.exe_deleted,
        from_descriptor: process.exec.from_descriptor,
        interpreter: process.exec.interpreter.clone(),
        namespace_pid: process.exec.namespace_pid,
        pid_namespace_level: process.exec.pid_namespace_level,
        systemd_unit: process.exec.systemd_unit.clone(),
        ..container_to_proto(process.container.as_deref())
    }
}

pub fn process_from_proto(process: pb::ProcessInfo) -> ProcessInfo {
    let container = container_from_proto(&process);
    ProcessInfo {
        pid: process.pid,
        ppid: process.ppid,
        exe: process.exe,
        argv: process.argv,
        argv_truncated: process.argv_truncated,
        uid: process.uid,
        gid: process.gid,
        user: process.user,
        cgroup: process.cgroup,
        comm: process.comm,
        ancestry: process_refs_from_proto(process.ancestry),
        container,
        exec: ExecFacts {
            fileless: process.fileless,
            exe_deleted: process.exe_deleted,
            from_descriptor: process.from_descriptor,
            interpreter: process.interpreter,
            namespace_pid: process.namespace_pid,
            pid_namespace_level: process.pid_namespace_level,
            systemd_unit: process.systemd_unit,
        },
    }
}

fn evidence_to_proto(evidence: &Evidence) -> pb::Evidence {
    pb::Evidence {
        process: evidence.process.as_ref().map(process_to_proto),
        peer_process: evidence.peer_process.as_ref().map(process_to_proto),
        local_addr: address_to_proto(evidence.local_addr),
        remote_addr: address_to_proto(evidence.remote_addr),
        source_zone: evidence.source_zone.clone(),
        destination_zone: evidence.destination_zone.clone(),
        netns: evidence.netns,
        remote_name: evidence.remote_name.clone(),
    }
}

fn evidence_from_proto(evidence: pb::Evidence) -> Result<Evidence, ConvertError> {
    Ok(Evidence {
        process: evidence.process.map(process_from_proto),
        peer_process: evidence.peer_process.map(process_from_proto),
        local_addr: address_from_proto("evidence.local_addr", evidence.local_addr)?,
        remote_addr: address_from_proto("evidence.remote_addr", evidence.remote_addr)?,
        source_zone: evidence.source_zone,
        destination_zone: evidence.destination_zone,
        netns: evidence.netns,
        remote_name: evidence.remote_name,
    })
}

pub fn deviation_to_proto(deviation: &Deviation) -> pb::Deviation {
    pb::Deviation {
        id: deviation.id.clone(),
        category: category_to_proto(deviation.category) as i32,
        severity: severity_to_proto(deviation.severity) as i32,
        stride: stride_to_proto(deviation.stride) as i32,
        summary: deviation.summary.clone(),
        source: deviation.source.clone(),
        destination: deviation.destination.clone(),
        protocol: protocol_to_proto(deviation.protocol) as i32,
        port: deviation.port.map(u32::from),
        evidence: Some(evidence_to_proto(&deviation.evidence)),
        first_seen: Some(deviation.first_seen.into()),
        last_seen: Some(deviation.last_seen.into()),
        count: deviation.count,
        resolution: deviation.resolution.clone(),
    }
}

/// Converts a received deviation back into the model type.
///
/// # Errors
///
/// A [`ConvertError`] naming the first field that is missing, unknown or malformed.
pub fn deviation_from_proto(deviation: pb::Deviation) -> Result<Deviation, ConvertError> {
    let port = deviation
        .port
        .map(|port| {
            u16::try_from(port).map_err(|_| ConvertError::PortOutOfRange {
                field: "port",
                value: port,
            })
        })
        .transpose()?;
    let evidence = deviation
        .evidence
        .ok_or(ConvertError::MissingField("evidence"))?;

    Ok(Deviation {
        id: deviation.id,
        category: category_from_proto(deviation.category)?,
        severity: severity_from_proto(deviation.severity)?,
        stride: stride_from_proto(deviation.stride)?,
        summary: deviation.summary,
        source: deviation.source,
        destination: deviation.destination,
        protocol: protocol_from_proto("protocol", deviation.protocol)?,
        port,
        evidence: evidence_from_proto(evidence)?,
        first_seen: timestamp_from_proto("first_seen", deviation.first_seen)?,
        last_seen: timestamp_from_proto("last_seen", deviation.last_seen)?,
        count: deviation.count,
        resolution: deviation.resolution,
    })
}

pub fn loss_to_proto(notice: &LossNotice) -> pb::LossNotice {
    let reason = match notice.reason {
        LossReason::SubscriberLagged => pb::LossReason::SubscriberLagged,
        LossReason::HistoryEvicted => pb::LossReason::HistoryEvicted,
    };
    pb::LossNotice {
        missed: notice.missed(),
        first_sequence: notice.first_sequence,
        last_sequence: notice.last_sequence,
        reason: reason as i32,
    }
}

pub fn hub_message_to_proto(message: &HubMessage) -> pb::StreamDeviationsResponse {
    use pb::stream_deviations_response::Payload;

    let (payload, node) = match message {
        HubMessage::Deviation {
            deviation, node, ..
        } => (
            Payload::Deviation(deviation_to_proto(deviation)),
            node.to_string(),
        ),
        HubMessage::Loss(notice) => (Payload::Loss(loss_to_proto(notice)), String::new()),
        HubMessage::NodeGap { gap, .. } => {
            let notice = pb::LossNotice {
                missed: gap.missed(),
                first_sequence: gap.first_sequence,
                last_sequence: gap.last_sequence,
                reason: pb::LossReason::NodeBufferOverflow as i32,
            };
            (Payload::Loss(notice), gap.node.to_string())
        }
    };
    pb::StreamDeviationsResponse {
        sequence: message.sequence(),
        payload: Some(payload),
        node,
    }
}

pub fn graph_to_proto(graph: &GraphSnapshot, taken_at: SystemTime) -> pb::Graph {
    let nodes = graph
        .nodes
        .iter()
        .map(|node| pb::Node {
            id: node.id.clone(),
            kind: node_kind_to_proto(node.kind) as i32,
            zone: node.zone.clone(),
            processes: node
                .processes
                .iter()
                .map(|process| pb::NodeProcess {
                    exe: process.exe.clone(),
                    cgroup: process.cgroup.clone(),
                    unit: process.unit.clone(),
                    // The engine does not know container layouts, so the container id comes
                    // from the agent's classification of the cgroup path.
                    container: process.container.clone().or_else(|| {
                        classify_cgroup(&process.cgroup)
                            .container
                            .map(|(_, id)| id)
                    }),
                })
                .collect(),
        })
        .collect();
    let edges = graph
        .edges
        .iter()
        .map(|edge| pb::Edge {
            source: edge.source.clone(),
            destination: edge.destination.clone(),
            protocol: protocol_to_proto(Some(edge.protocol)) as i32,
            port: u32::from(edge.port),
            declared: edge.declared,
            first_seen: Some(edge.first_seen.into()),
            last_seen: Some(edge.last_seen.into()),
            connections: edge.connections,
            examples: process_refs_to_proto(&edge.examples),
            remote_names: edge.remote_names.clone(),
        })
        .collect();
    pb::Graph {
        nodes,
        edges,
        taken_at: Some(taken_at.into()),
    }
}

/// Converts a received graph back into the model's snapshot type.
///
/// # Errors
///
/// A [`ConvertError`] naming the first field that is missing, unknown or malformed.
pub fn graph_from_proto(graph: pb::Graph) -> Result<GraphSnapshot, ConvertError> {
    let nodes = graph
        .nodes
        .into_iter()
        .map(|node| {
            Ok(NodeSnapshot {
                id: node.id,
                kind: node_kind_from_proto(node.kind)?,
                zone: node.zone,
                processes: node
                    .processes
                    .into_iter()
                    .map(|process| NodeProcess {
                        exe: process.exe,
                        cgroup: process.cgroup,
                        unit: process.unit,
                        container: process.container,
                    })
                    .collect(),
            })
        })
        .collect::<Result<_, ConvertError>>()?;
    let edges = graph
        .edges
        .into_iter()
        .map(|edge| {
            let protocol = protocol_from_proto("edge.protocol", edge.protocol)?
                .ok_or(ConvertError::MissingField("edge.protocol"))?;
            let port = u16::try_from(edge.port).map_err(|_| ConvertError::PortOutOfRange {
                field: "edge.port",
                value: edge.port,
            })?;
            Ok(EdgeSnapshot {
                source: edge.source,
                destination: edge.destination,
                protocol,
                port,
                declared: edge.declared,
                first_seen: timestamp_from_proto("edge.first_seen", edge.first_seen)?,
                last_seen: timestamp_from_proto("edge.last_seen", edge.last_seen)?,
                connections: edge.connections,
                examples: process_refs_from_proto(edge.examples),
                remote_names: edge.remote_names,
            })
        })
        .collect::<Result<_, ConvertError>>()?;
    Ok(GraphSnapshot { nodes, edges })
}

/// Builds the `GetStatus` response from the pipeline's snapshot and the hub's counters, which
/// follow the pipeline's counters with an `api_` prefix.
pub fn status_to_proto(
    status: &StatusSnapshot,
    hub: &HubCounters,
    now: SystemTime,
) -> pb::AgentStatus {
    let uptime = now
        .duration_since(status.started_at)
        .unwrap_or(Duration::ZERO);
    let hooks = status
        .hooks
        .iter()
        .map(|hook| pb::HookStatus {
            name: hook.name.clone(),
            attached: hook.attached,
            error: hook.error.clone().unwrap_or_default(),
        })
        .collect();

    let mut counters: Vec<pb::Counter> = status
        .counters
        .iter()
        .map(|(name, value)| pb::Counter {
            name: name.clone(),
            value: *value,
        })
        .collect();
    let hub_counters = [
        ("api_published", hub.published),
        ("api_history_evicted", hub.evicted),
        ("api_dropped_slow_subscriber", hub.dropped_slow),
        ("api_subscribers", hub.subscribers),
    ];
    counters.extend(hub_counters.into_iter().map(|(name, value)| pb::Counter {
        name: name.into(),
        value,
    }));

    let model = status.model.as_ref().map(model_info_to_proto);

    pb::AgentStatus {
        version: status.version.clone(),
        started_at: Some(status.started_at.into()),
        uptime: prost_types::Duration::try_from(uptime).ok(),
        hooks,
        counters,
        model,
        last_sequence: hub.last_sequence,
        oldest_retained_sequence: hub.oldest_retained_sequence,
        nodes: Vec::new(),
    }
}

pub fn node_status_to_proto(node: &NodeStatus) -> pb::NodeStatus {
    pb::NodeStatus {
        name: node.name.clone(),
        connected: node.connected,
        acknowledged_sequence: node.acknowledged_sequence,
        received: node.received,
        duplicates: node.duplicates,
        lost: node.lost,
        connected_at: node.connected_at.map(Into::into),
        version: node.version.clone(),
    }
}

pub fn model_info_to_proto(model: &ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        path: model.path.display().to_string(),
        loaded_at: Some(model.loaded_at.into()),
        zones: saturate_u32(model.zones),
        components: saturate_u32(model.components),
        flows: saturate_u32(model.flows),
    }
}

/// Builds the `ReloadModel` response. A file whose content is that of the model in force is
/// reported as accepted and unchanged.
pub fn reload_outcome_to_proto(outcome: &ReloadOutcome) -> pb::ReloadModelResponse {
    use pb::reload_model_response::Outcome;
    let outcome = match outcome {
        ReloadOutcome::Accepted(accepted) => Outcome::Accepted(pb::ModelAccepted {
            model: Some(model_info_to_proto(&accepted.info)),
            digest: accepted.digest.clone(),
            exceptions: saturate_u32(accepted.exceptions),
            deviations_raised: saturate_u32(accepted.deviations_raised),
            warnings: accepted.warnings.iter().map(ToString::to_string).collect(),
            unchanged: false,
        }),
        ReloadOutcome::Unchanged { info, digest, exceptions } => Outcome::Accepted(pb::ModelAccepted {
            model: Some(model_info_to_proto(info)),
            digest: digest.clone(),
            exceptions: saturate_u32(*exceptions),
            deviations_raised: 0,
            warnings: Vec::new(),
            unchanged: true,
        }),
        ReloadOutcome::Rejected { errors, in_force } => Outcome::Rejected(pb::ModelRejected {
            errors: errors
                .iter()
                .map(|error| pb::ModelLocatedError {
                    file: error.location.source.clone(),
                    line: saturate_u32(error.location.line),
                    column: saturate_u32(error.location.column),
                    message: error.kind.to_string(),
                    hint: error.kind.hint().unwrap_or_default(),
                })
                .collect(),
            model_in_force: Some(model_info_to_proto(in_force)),
        }),
    };
    pb::ReloadModelResponse {
        outcome: Some(outcome),
    }
}

fn saturate_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
