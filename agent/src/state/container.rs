//! Classification of a cgroup v2 path into the systemd unit, the container and its runtime, and
//! the Kubernetes pod that a process runs in.
//!
//! The layouts recognised are the ones the runtimes create with either cgroup driver:
//! systemd (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, pods as
//! `kubepods-<qos>-pod<uid with _>.slice`) and cgroupfs (`/docker/<id>`, `/kubepods/<qos>/pod<uid>/<id>`,
//! `crio-<id>`). A container id is 64 hex digits.

/// Container runtime that named a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    /// A Kubernetes pod's container whose cgroup names no runtime (cgroupfs driver).
    Kubernetes,
}

/// Unit, container and pod of a process, as far as its cgroup path shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupOrigin {
    /// The innermost systemd unit (`nginx.service`, `docker-<id>.scope`).
    pub systemd_unit: Option<String>,
    /// Runtime and 64-hex-digit container id.
    pub container: Option<(Runtime, String)>,
    /// Kubernetes pod uid, with dashes.
    pub pod_uid: Option<String>,
}

/// Classifies a cgroup v2 path such as `/system.slice/docker-<id>.scope`.
pub fn classify_cgroup(path: &str) -> CgroupOrigin {
    let mut origin = CgroupOrigin::default();
    let components: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
    for (index, component) in components.iter().enumerate() {
        if is_unit(component) {
            origin.systemd_unit = Some(component.to_string());
        }
        if let Some(uid) = pod_uid(component) {
            origin.pod_uid = Some(uid);
        }
        let parent = index.checked_sub(1).map(|previous| components[previous]);
        if let Some(container) = container_id(component, parent, origin.pod_uid.is_some()) {
            origin.container = Some(container);
        }
    }
    origin
}

fn is_unit(component: &str) -> bool {
    [".service", ".scope", ".socket", ".mount", ".swap"]
        .iter()
        .any(|suffix| component.len() > suffix.len() && component.ends_with(suffix))
}

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let start = name.rfind("pod")?;
    let uid = &name[start + 3..];
    let prefix_ok = start == 0 || name[..start].ends_with('-');
    let uid = uid.replace('_', "-");
    let valid = uid.len() == 36 && uid.bytes().all(|byte| byte.is_ascii_hexdigit() || byte == b'-');
    (prefix_ok && valid).then_some(uid)
}

fn container_id(component: &str, parent: Option<&str>, in_pod: bool) -> Option<(Runtime, String)> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    for (prefix, runtime) in [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
    ] {
        if let Some(id) = name.strip_prefix(prefix) {
            if is_container_id(id) {
                return Some((runtime, id.to_string()));
            }
        }
    }
    if is_container_id(name) {
        if parent == Some("docker") {
            return Some((Runtime::Docker, name.to_string()));
        }
        if in_pod {
            return Some((Runtime::Kubernetes, name.to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c3b2a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
    const POD: &str = "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d";

    #[test]
    fn systemd_service_is_the_unit() {
        let origin = classify_cgroup("/system.slice/nginx.service");
        assert_eq!(origin.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!(origin.container, None);
    }

    #[test]
    fn docker_layouts_give_the_container_id() {
        let systemd = classify_cgroup(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(systemd.container, Some((Runtime::Docker, ID.to_string())));
        let cgroupfs = classify_cgroup(&format!("/docker/{ID}"));
        assert_eq!(cgroupfs.container, Some((Runtime::Docker, ID.to_string())));
    }

    #[test]
    fn kubernetes_layouts_give_pod_and_container() {
        let pod_systemd = POD.replace('-', "_");
        let containerd = classify_cgroup(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_systemd}.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(containerd.pod_uid.as_deref(), Some(POD));
        assert_eq!(containerd.container, Some((Runtime::Containerd, ID.to_string())));
        let crio = classify_cgroup(&format!("/kubepods/besteffort/pod{POD}/crio-{ID}"));
        assert_eq!(crio.container, Some((Runtime::CriO, ID.to_string())));
        let plain = classify_cgroup(&format!("/kubepods/pod{POD}/{ID}"));
        assert_eq!(plain.pod_uid.as_deref(), Some(POD));
        assert_eq!(plain.container, Some((Runtime::Kubernetes, ID.to_string())));
    }

    #[test]
    fn ids_of_the_wrong_length_are_not_containers() {
        assert_eq!(classify_cgroup("/docker/abc123").container, None);
        assert_eq!(classify_cgroup("/user.slice/podman.slice").pod_uid, None);
    }
}
