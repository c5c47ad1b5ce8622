//! Naming the two ends of a flow: which graph node each is and which zone it belongs to.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};

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

/// Maximum number of processes whose attribution [`AttributionCache`] keeps.
const ATTRIBUTIONS_MAX: usize = 4096;

/// The attribution of each process resolved lately, by the address of its shared [`ProcessInfo`].
///
/// The pipeline hands every flow of a process the same `Arc`, and a changed process (a new exec,
/// labels that arrived) is a new `Arc`. Each entry keeps a [`Weak`] to its `ProcessInfo`, so the
/// address cannot be reused by another process while the entry exists. The cache belongs to one
/// model and is emptied with it, and when full.
#[derive(Debug, Default)]
pub(crate) struct AttributionCache {
    entries: crate::FastMap<usize, CachedAttribution>,
}

/// One process's entry in [`AttributionCache`].
#[derive(Debug)]
struct CachedAttribution {
    /// Keeps the address of the process's `ProcessInfo` from being reused.
    _process: Weak<ProcessInfo>,
    /// Index of the component in the model, and how the process was attributed to it.
    attribution: Option<(usize, Attribution)>,
}

impl AttributionCache {
    /// Returns [`Model::attribute_process`] for `process`, from the cache when it was resolved
    /// before.
    pub(crate) fn attribute<'m>(
        &mut self,
        model: &'m Model,
        process: &Arc<ProcessInfo>,
    ) -> Option<(&'m Component, Attribution)> {
        let address = Arc::as_ptr(process) as usize;
        if let Some(cached) = self.entries.get(&address) {
            let (index, how) = cached.attribution?;
            return Some((model.components.get(index)?, how));
        }
        let attribution = model.attribute_process(process);
        let indexed = attribution.and_then(|(component, how)| {
            let index = model.components.iter().position(|candidate| std::ptr::eq(candidate, component))?;
            Some((index, how))
        });
        if self.entries.len() >= ATTRIBUTIONS_MAX {
            self.entries.clear();
        }
        self.entries.insert(address, CachedAttribution { _process: Arc::downgrade(process), attribution: indexed });
        attribution
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Resolves a process on this host through the model's attribution rules.
pub(crate) fn local<'m, 'o>(
    model: &'m Model,
    process: &'o Arc<ProcessInfo>,
    addr: SocketAddr,
) -> Side<'m, 'o> {
    local_attributed(model, model.attribute_process(process), process, addr)
}

/// Builds the side of a process on this host from its attribution.
pub(crate) fn local_attributed<'m, 'o>(
    model: &'m Model,
    attribution: Option<(&'m Component, Attribution)>,
    process: &'o Arc<ProcessInfo>,
    addr: SocketAddr,
) -> Side<'m, 'o> {
    match attribution {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = r#"version: 1
zones:
  - { id: inside, trust: 50 }
components:
  - { id: web, zone: inside, match: { exe: ["/usr/sbin/nginx"] } }
  - { id: api, zone: inside, match: { exe: ["/srv/api"] } }
"#;

    fn process(pid: u32, exe: &str) -> Arc<ProcessInfo> {
        Arc::new(ProcessInfo {
            pid,
            ppid: 1,
            exe: exe.to_owned(),
            argv: vec![exe.to_owned()],
            argv_truncated: false,
            uid: 0,
            gid: 0,
            user: None,
            cgroup: "/system.slice/test.service".to_owned(),
            comm: String::new(),
            ancestry: Vec::new(),
            container: None,
            exec: Default::default(),
        })
    }

    fn component_of(cache: &mut AttributionCache, model: &Model, process: &Arc<ProcessInfo>) -> Option<String> {
        cache.attribute(model, process).map(|(component, _)| component.id.clone())
    }

    #[test]
    fn cache_answers_repeats_from_one_entry() {
        let model = Model::parse(MODEL, "test.yaml").unwrap();
        let mut cache = AttributionCache::default();
        let web = process(10, "/usr/sbin/nginx");
        assert_eq!(component_of(&mut cache, &model, &web).as_deref(), Some("web"));
        assert_eq!(component_of(&mut cache, &model, &web).as_deref(), Some("web"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn cache_resolves_a_new_process_anew() {
        let model = Model::parse(MODEL, "test.yaml").unwrap();
        let mut cache = AttributionCache::default();
        // The same pid after an exec is a new ProcessInfo; the first one is gone, but its cache
        // entry keeps its address from being reused.
        let before = process(10, "/usr/sbin/nginx");
        assert_eq!(component_of(&mut cache, &model, &before).as_deref(), Some("web"));
        drop(before);
        for _ in 0..100 {
            let after = process(10, "/srv/api");
            assert_eq!(component_of(&mut cache, &model, &after).as_deref(), Some("api"));
        }
        let unknown = process(11, "/usr/bin/bash");
        assert_eq!(component_of(&mut cache, &model, &unknown), None);
        assert_eq!(component_of(&mut cache, &model, &unknown), None);
    }

    #[test]
    fn new_model_attributes_again() {
        let mut engine = crate::Engine::new(Model::parse(MODEL, "test.yaml").unwrap());
        let client = process(10, "/usr/sbin/nginx");
        let flow = crate::observation::FlowObservation {
            time: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_735_689_600),
            protocol: Protocol::Tcp,
            client: Some(client),
            server: None,
            client_addr: "10.0.0.1:40000".parse().unwrap(),
            server_addr: "192.0.2.9:443".parse().unwrap(),
            netns: 1,
            remote_name: None,
        };
        let ids = |raised: Vec<crate::deviation::Deviation>| raised.into_iter().map(|d| d.id).collect::<Vec<_>>();
        let before = ids(engine.observe_flow(&flow));
        assert!(before.iter().any(|id| id.starts_with("unexpected-flow@web@")), "{before:?}");

        // The same process, now selected by the other component.
        let swapped = MODEL.replace("/usr/sbin/nginx", "/usr/sbin/none").replace("/srv/api", "/usr/sbin/nginx");
        let after = ids(engine.replace_model(Model::parse(&swapped, "test.yaml").unwrap()));
        assert!(after.iter().any(|id| id.starts_with("unexpected-flow@api@")), "{after:?}");
    }

    #[test]
    fn full_cache_starts_again() {
        let model = Model::parse(MODEL, "test.yaml").unwrap();
        let mut cache = AttributionCache::default();
        let processes: Vec<_> = (0..=ATTRIBUTIONS_MAX as u32).map(|pid| process(pid, "/srv/api")).collect();
        for process in &processes {
            assert_eq!(component_of(&mut cache, &model, process).as_deref(), Some("api"));
        }
        assert_eq!(cache.len(), 1);
    }
}
