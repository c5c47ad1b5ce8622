//! Findings beyond a single connection: denied flows that connected, attack paths over the
//! observed graph, and declared flows that nothing uses.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::endpoint::Side;
use super::{explain, flow_evidence, impact_of, Finding};
use crate::deviation::{Category, Evidence};
use crate::graph::AttackPath;
use crate::model::{Criticality, Flow, Model};
use crate::observation::FlowObservation;
use crate::pattern::format_date;
use crate::severity::{self, Impact, Likelihood};

/// A connection that a `deny` flow covers. The control was expected to stop it, so likelihood is
/// high (it happened) and impact is at least high, which puts the severity at high or critical.
pub(super) fn control_failed(
    model: &Model,
    flow: &Flow,
    observation: &FlowObservation,
    source: &Side<'_, '_>,
    destination: &Side<'_, '_>,
) -> Finding {
    let protocol = observation.protocol;
    let port = observation.server_addr.port();
    let summary = format!(
        "{} connected to {} on {}, which the deny flow {} -> {} at line {} of {} forbids: the control that should stop it did not",
        explain::describe_source(source),
        explain::describe_destination(destination),
        explain::port_label(protocol, port),
        flow.from,
        flow.to,
        flow.line,
        model.source,
    );
    let resolution = format!(
        "# If this connection is intended, delete the deny flow at line {} and declare it:\n{}",
        flow.line,
        explain::flow_resolution(source, destination, protocol, port)
    );
    Finding {
        category: Category::ControlFailed,
        likelihood: Likelihood::High,
        impact: impact_of(destination).max(Impact::High),
        source: source.node.clone(),
        destination: destination.node.clone(),
        protocol: Some(protocol),
        port: Some(port),
        summary,
        resolution,
        evidence: flow_evidence(observation, source, destination),
    }
}

/// Entry points of attack paths: exposed components, untrusted zones and addresses in no zone.
pub(super) fn is_path_entry(model: &Model, node: &str) -> bool {
    if let Some(component) = model.component(node) {
        return component.exposed;
    }
    if let Some(zone) = model.zone(node) {
        return severity::is_untrusted(zone);
    }
    node.starts_with("external:")
}

/// Targets of attack paths: components of high or critical criticality.
pub(super) fn is_path_target(model: &Model, node: &str) -> bool {
    model
        .component(node)
        .is_some_and(|c| c.criticality >= Criticality::High)
}

/// Describes an attack path hop by hop, with the processes seen on each hop.
pub(super) fn attack_path(model: &Model, path: &AttackPath, evidence: Evidence) -> Finding {
    let first = &path.hops[0];
    let criticality = model
        .component(&path.target)
        .map_or(Criticality::High, |c| c.criticality);

    let mut summary = format!(
        "observed traffic opens a path from {} to {} ({} criticality) that the declared flows do not allow:",
        path.entry,
        path.target,
        criticality.as_str()
    );
    for (i, hop) in path.hops.iter().enumerate() {
        let status = if hop.declared {
            "declared"
        } else {
            "undeclared"
        };
        let processes: Vec<String> = hop
            .examples
            .iter()
            .map(|(pid, exe)| format!("{exe} (pid {pid})"))
            .collect();
        let processes = if processes.is_empty() {
            "no local process".to_owned()
        } else {
            processes.join(", ")
        };
        let _ = write!(
            summary,
            " {}. {} -> {} on {} ({status}, by {processes});",
            i + 1,
            hop.source,
            hop.destination,
            explain::port_label(hop.protocol, hop.port),
        );
    }
    summary.pop();

    let mut resolution = String::from(
        "# If every hop is intended, declare the undeclared ones; otherwise deny the first one.\nflows:\n",
    );
    for hop in path.hops.iter().filter(|h| !h.declared) {
        let proto = match hop.protocol {
            crate::observation::Protocol::Tcp => String::new(),
            crate::observation::Protocol::Udp => ", proto: udp".to_owned(),
        };
        let _ = writeln!(
            resolution,
            "  - {{ from: {}, to: {}, port: {}{proto} }}",
            hop.source, hop.destination, hop.port
        );
    }

    Finding {
        category: Category::NewAttackPath,
        likelihood: Likelihood::High,
        impact: Impact::of_criticality(criticality),
        source: path.entry.clone(),
        destination: path.target.clone(),
        protocol: Some(first.protocol),
        port: Some(first.port),
        summary,
        resolution,
        evidence,
    }
}

/// An allowed flow that no connection covered within the window: informational, because the
/// model may only be stale, but an unused allowance is attack surface nobody needs.
pub(super) fn flow_unused(flow: &Flow, last_seen: Option<SystemTime>, window: Duration) -> Finding {
    let ports: Vec<String> = flow.ports.iter().map(u16::to_string).collect();
    let seen = match last_seen {
        Some(time) => format!("last seen on {}", format_date(time)),
        None => "never seen".to_owned(),
    };
    let summary = format!(
        "the declared flow {} -> {} on {}/{} (line {}) was {seen}, and the window is {} hours",
        flow.from,
        flow.to,
        flow.protocol.as_str(),
        ports.join(","),
        flow.line,
        window.as_secs() / 3600,
    );
    let resolution = format!(
        "# Delete the flow at line {} if it is no longer needed, or keep it if it is seasonal:\n# flows:\n#   - {{ from: {}, to: {}, ports: [{}] }}\n",
        flow.line,
        flow.from,
        flow.to,
        ports.join(", ")
    );
    Finding {
        category: Category::DeclaredFlowUnused,
        likelihood: Likelihood::Low,
        impact: Impact::Low,
        source: flow.from.clone(),
        destination: flow.to.clone(),
        protocol: Some(flow.protocol),
        port: flow.ports.first().copied(),
        summary,
        resolution,
        evidence: Evidence {
            process: None,
            peer_process: None,
            local_addr: None,
            remote_addr: None,
            source_zone: None,
            destination_zone: None,
            netns: 0,
            remote_name: None,
        },
    }
}
