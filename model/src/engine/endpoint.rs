//! Naming the two ends of a flow: which graph node each is and which zone it belongs to.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::graph::{NodeKind, NodeProcess, NodeRef};
use crate::model::{Attribution, Component, Model, Zone};
use crate::observation::{ProcessInfo, Protocol};
use crate::workload::workload_cgroup;

/// The resolution of one end of a flow or a listener.
#[derive(Debug, Clone)]
pub(crate) enum Resolved<'m> {
    /// A process on this host, or a remote address, that belongs to a declared component.
    Component {
        component: &'m Component,
        zone: &'m Zone,
        attribution: Option<Attribution>,
    },
    /// A process on this host that matches no component.
    UnknownProcess,
    /// A remote address inside a declared zone.
    Zone(&'m Zone),
    /// A remote address in no declared zone.
    External(IpAddr),
}

/// One end of a flow.
#[derive(Debug, Clone)]
pub(crate) struct Side<'m, 'o> {
    pub node: String,
    pub resolved: Resolved<'m>,
    pub process: Option<&'o Arc<ProcessInfo>>,
    pub addr: SocketAddr,
}

impl<'m> Side<'m, '_> {
    pub fn zone(&self) -> Option<&'m Zone> {
        match &self.resolved {
            Resolved::Component { zone, .. } => Some(zone),
            Resolved::Zone(zone) => Some(zone),
            Resolved::UnknownProcess | Resolved::External(_) => None,
        }
    }

    pub fn zone_id(&self) -> Option<&'m str> {
        self.zone().map(|z| z.id.as_str())
    }

    pub fn component(&self) -> Option<&'m Component> {
        match &self.resolved {
            Resolved::Component { component, .. } => Some(component),
            _ => None,
        }
    }

    pub fn is_unknown_process(&self) -> bool {
        matches!(self.resolved, Resolved::UnknownProcess)
    }

    pub fn node_ref(&self) -> NodeRef {
        let kind = match &self.resolved {
            Resolved::Component { .. } => NodeKind::Declared,
            Resolved::UnknownProcess => NodeKind::Discovered,
            Resolved::Zone(_) | Resolved::External(_) => NodeKind::External,
        };
        NodeRef {
            id: self.node.clone(),
            kind,
            zone: self.zone_id().map(str::to_owned),
            process: self.process.map(|process| NodeProcess::of(process)),
        }
    }
}

/// Names the graph node of a process that matches no component, so that the processes of one
/// workload share a node:
///
/// - a Kubernetes container: `unknown:k8s:<namespace>/<workload>/<container>`, where the workload
///   is the pod's `app.kubernetes.io/name` or `app` label, else the pod name;
/// - another named container: `unknown:<runtime>:<name>`, where a Docker Compose container's
///   name is its `com.docker.compose.service` label, so its replicas share the node;
/// - a container whose runtime has not (or not yet) named it: `unknown:container:<12-digit id>`;
/// - a process in a workload's cgroup (a service, scope or other cgroup of its own):
///   `unknown:cgroup:<path>`, so every program of one unmodelled service shares a node;
/// - any other process: `unknown:<executable>`.
pub(crate) fn unknown_node(process: &ProcessInfo) -> String {
    let Some(container) = process.container.as_deref() else {
        return match workload_cgroup(&process.cgroup) {
            Some(workload) => format!("unknown:cgroup:{workload}"),
            None => format!("unknown:{}", process.exe),
        };
    };
    if let Some(pod) = container.pod.as_ref().filter(|pod| !pod.name.is_empty()) {
        let labels = pod.labels.as_ref();
        let workload = ["app.kubernetes.io/name", "app"]
            .iter()
            .find_map(|key| labels.and_then(|labels| labels.get(*key)))
            .unwrap_or(&pod.name);
        let mut node = format!("unknown:k8s:{}/{workload}", pod.namespace);
        if !container.name.is_empty() {
            node.push('/');
            node.push_str(&container.name);
        }
        return node;
    }
    let compose_service = container
        .labels()
        .and_then(|labels| labels.get("com.docker.compose.service"));
    match compose_service {
        Some(service) => format!("unknown:{}:{service}", container.runtime),
        None if !container.name.is_empty() => {
            format!("unknown:{}:{}", container.runtime, container.name)
        }
        None => {
            let short = container.id.get(..12).unwrap_or(&container.id);
            format!("unknown:container:{short}")
        }
    }
}

pub(crate) fn external_node(ip: IpAddr) -> String {
    format!("external:{}", ip.to_canonical())
}

/// Resolves a process on this host through the model's attribution rules.
pub(crate) fn local<'m, 'o>(
    model: &'m Model,
    process: &'o Arc<ProcessInfo>,
    addr: SocketAddr,
) -> Side<'m, 'o> {
    match model.attribute_process(process) {
        Some((component, attribution)) => Side {
            node: component.id.clone(),
            resolved: Resolved::Component {
                component,
                zone: model.component_zone(component),
                attribution: Some(attribution),
            },
            process: Some(process),
            addr,
        },
        None => Side {
            node: unknown_node(process),
            resolved: Resolved::UnknownProcess,
            process: Some(process),
            addr,
        },
    }
}

/// Resolves a remote client address: to its zone, or to `external:<ip>`.
pub(crate) fn remote_client<'m, 'o>(model: &'m Model, addr: SocketAddr) -> Side<'m, 'o> {
    match model.resolve_endpoint(addr.ip()) {
        Some(zone) => Side {
            node: zone.id.clone(),
            resolved: Resolved::Zone(zone),
            process: None,
            addr,
        },
        None => remote_external(addr),
    }
}

/// Resolves a remote server address: to a component the model singles out for that address and
/// port, else to its zone, else to `external:<ip>`.
pub(crate) fn remote_server<'m, 'o>(
    model: &'m Model,
    addr: SocketAddr,
    protocol: Protocol,
) -> Side<'m, 'o> {
    if let Some(component) = model.resolve_remote_service(addr.ip(), protocol, addr.port()) {
        let resolved = Resolved::Component {
            component,
            zone: model.component_zone(component),
            attribution: None,
        };
        return Side {
            node: component.id.clone(),
            resolved,
            process: None,
            addr,
        };
    }
    remote_client(model, addr)
}

fn remote_external<'m, 'o>(addr: SocketAddr) -> Side<'m, 'o> {
    let ip = addr.ip().to_canonical();
    Side {
        node: external_node(ip),
        resolved: Resolved::External(ip),
        process: None,
        addr,
    }
}
