//! The workload a process belongs to, read from its cgroup v2 path. Processes that match no
//! component are grouped by workload, so one unmodelled service is one graph node and one learned
//! component however many processes and programs it runs.

/// Returns the cgroup that stands for the workload of a process in `cgroup`, or `None` when the
/// path names no workload.
///
/// The workload is the path up to its innermost systemd service or scope (which is also where
/// Docker, containerd and CRI-O put a container under the systemd cgroup driver), so the
/// sub-cgroups a service creates for its workers stay in it. A path with no such unit is a
/// workload as a whole: a container under the cgroupfs driver (`/docker/<id>`) or a directory
/// an operator created for one service. Login sessions (`session-*.scope`), the per-user manager
/// (`user@*.service`), everything else under `user.slice`, `init.scope` and the root cgroup name
/// no workload, since what runs there has nothing in common but its user.
pub fn workload_cgroup(cgroup: &str) -> Option<&str> {
    let trimmed = cgroup.trim_end_matches('/');
    if trimmed.is_empty() {
        return None;
    }
    let mut end = None;
    let mut offset = 0;
    for segment in trimmed.split('/') {
        let segment_end = offset + segment.len();
        if is_workload_unit(segment) {
            end = Some(segment_end);
        }
        offset = segment_end + 1;
    }
    if let Some(end) = end {
        return Some(&trimmed[..end]);
    }
    let generic = trimmed
        .split('/')
        .any(|segment| segment == "user.slice" || segment == "init.scope" || is_session_unit(segment));
    (!generic).then_some(trimmed)
}

fn is_workload_unit(segment: &str) -> bool {
    let unit = segment.ends_with(".service") || segment.ends_with(".scope");
    unit && !is_session_unit(segment) && segment != "init.scope"
}

/// Units that hold whatever a user runs rather than one service.
fn is_session_unit(segment: &str) -> bool {
    (segment.starts_with("session-") && segment.ends_with(".scope"))
        || (segment.starts_with("user@") && segment.ends_with(".service"))
}

#[cfg(test)]
mod tests {
    use super::workload_cgroup;

    #[test]
    fn service_is_its_unit() {
        assert_eq!(workload_cgroup("/system.slice/nginx.service"), Some("/system.slice/nginx.service"));
        assert_eq!(workload_cgroup("/system.slice/nginx.service/worker"), Some("/system.slice/nginx.service"));
    }

    #[test]
    fn container_scope_is_a_workload() {
        let id = "4f1c3b2a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
        let scope = format!("/system.slice/docker-{id}.scope");
        assert_eq!(workload_cgroup(&scope), Some(scope.as_str()));
        let cgroupfs = format!("/docker/{id}");
        assert_eq!(workload_cgroup(&cgroupfs), Some(cgroupfs.as_str()));
    }

    #[test]
    fn plain_directory_is_a_workload() {
        assert_eq!(workload_cgroup("/driftwatch-demo/web"), Some("/driftwatch-demo/web"));
    }

    #[test]
    fn user_service_is_a_workload() {
        let path = "/user.slice/user-1000.slice/user@1000.service/app.slice/syncthing.service";
        assert_eq!(workload_cgroup(path), Some(path));
    }

    #[test]
    fn sessions_and_root_are_not() {
        assert_eq!(workload_cgroup("/"), None);
        assert_eq!(workload_cgroup(""), None);
        assert_eq!(workload_cgroup("/init.scope"), None);
        assert_eq!(workload_cgroup("/user.slice/user-1000.slice/session-3.scope"), None);
        assert_eq!(workload_cgroup("/user.slice/user-1000.slice/user@1000.service/init.scope"), None);
    }
}
