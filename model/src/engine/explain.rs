//! The words of a deviation: its one-sentence summary and the model YAML that would resolve it.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::endpoint::{Resolved, Side};
use crate::model::{Attribution, Component, Model};
use crate::observation::{ProcessInfo, Protocol};

/// `/bin/bash (pid 4242)`, with how the program was started when that is unusual:
/// `/tmp/x (pid 4242, deleted binary)`.
pub(crate) fn process_label(process: &ProcessInfo) -> String {
    let exec = &process.exec;
    let mut notes = Vec::new();
    if exec.fileless {
        notes.push("fileless".to_string());
    } else if exec.exe_deleted {
        notes.push("deleted binary".to_string());
    }
    if let Some(interpreter) = &exec.interpreter {
        notes.push(format!("run by {interpreter}"));
    }
    let mut label = format!("{} (pid {}", process.exe, process.pid);
    for note in notes {
        label.push_str(", ");
        label.push_str(&note);
    }
    label.push(')');
    label
}

/// Explains how a process came to be in its component, when it is not by its own selectors.
fn attribution_note(process: &ProcessInfo, attribution: Option<Attribution>) -> String {
    match attribution {
        Some(Attribution::Cgroup) => format!(" (by its cgroup {})", process.cgroup),
        Some(Attribution::Ancestor(pid)) => {
            let exe = process
                .ancestry
                .iter()
                .find(|(p, _)| *p == pid)
                .map_or("?", |(_, exe)| exe.as_str());
            format!(" (started by {exe}, pid {pid})")
        }
        Some(Attribution::Selectors) | None => String::new(),
    }
}

/// Describes the acting end of a flow in full: `/bin/bash (pid 4242) in component web`.
pub(crate) fn describe_source(side: &Side<'_, '_>) -> String {
    match (&side.resolved, side.process) {
        (
            Resolved::Component {
                component,
                attribution,
                ..
            },
            Some(process),
        ) => {
            format!(
                "{} in component {}{}",
                process_label(process),
                component.id,
                attribution_note(process, *attribution)
            )
        }
        (Resolved::UnknownProcess, Some(process)) => {
            format!("{}, which matches no component,", process_label(process))
        }
        (Resolved::Component { component, .. }, None) => {
            format!("{} at {}", component.id, side.addr.ip())
        }
        (Resolved::Zone(zone), _) => format!("{} in zone {}", side.addr.ip(), zone.id),
        (Resolved::External(ip), _) => ip.to_string(),
        (Resolved::UnknownProcess, None) => side.node.clone(),
    }
}

/// Describes the other end of a flow briefly: `db`, `10.0.0.5 in zone core`.
pub(crate) fn describe_destination(side: &Side<'_, '_>) -> String {
    match (&side.resolved, side.process) {
        (Resolved::Component { component, .. }, Some(_)) => component.id.clone(),
        (Resolved::Component { component, .. }, None) => {
            format!("{} at {}", component.id, side.addr.ip())
        }
        (Resolved::UnknownProcess, Some(process)) => process_label(process),
        (Resolved::Zone(zone), _) => format!("{} in zone {}", side.addr.ip(), zone.id),
        (Resolved::External(ip), _) => ip.to_string(),
        (Resolved::UnknownProcess, None) => side.node.clone(),
    }
}

pub(crate) fn port_label(protocol: Protocol, port: u16) -> String {
    format!("{}/{port}", protocol.as_str())
}

/// Quotes text as a YAML double-quoted scalar, which JSON string syntax is.
fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serialises")
}

/// Escapes glob metacharacters, so that a suggested selector matches exactly the observed path
/// and not, for a program named `s*`, every file beside it.
pub(crate) fn glob_literal(text: &str) -> String {
    let mut literal = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            literal.push('\\');
        }
        literal.push(character);
    }
    literal
}

fn quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

fn flow_entry(from: &str, to: &str, protocol: Protocol, port: u16) -> String {
    match protocol {
        Protocol::Tcp => format!("  - {{ from: {from}, to: {to}, port: {port} }}\n"),
        Protocol::Udp => format!("  - {{ from: {from}, to: {to}, port: {port}, proto: udp }}\n"),
    }
}

/// Derives a zone id for a single external address: `net-198-51-100-7`.
fn zone_name_for(ip: IpAddr) -> String {
    let text: String = ip
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("net-{}", text.trim_matches('-'))
}

fn zone_stub(ip: IpAddr) -> String {
    format!(
        "  - {{ id: {}, trust: 0, match: {{ cidrs: [{}] }} }}\n",
        zone_name_for(ip),
        quote(&IpNet::from(ip).to_string())
    )
}

/// Names a side as the model would once it is declared. An external address gets a zone stub.
fn declared_name(side: &Side<'_, '_>) -> String {
    match &side.resolved {
        Resolved::External(ip) => zone_name_for(*ip),
        _ => side.node.clone(),
    }
}

/// Writes a flow entry, preceded by a zone for each end that is an external address.
pub(crate) fn flow_resolution(
    source: &Side<'_, '_>,
    destination: &Side<'_, '_>,
    protocol: Protocol,
    port: u16,
) -> String {
    let mut out = String::new();
    let stubs: Vec<String> = [source, destination]
        .into_iter()
        .filter_map(|side| match side.resolved {
            Resolved::External(ip) => Some(zone_stub(ip)),
            _ => None,
        })
        .collect();
    if !stubs.is_empty() {
        out.push_str("zones:\n");
        stubs.iter().for_each(|stub| out.push_str(stub));
    }
    out.push_str("flows:\n");
    out.push_str(&flow_entry(
        &declared_name(source),
        &declared_name(destination),
        protocol,
        port,
    ));
    out
}

/// Derives a component id from an executable's file name: `/usr/bin/python3.12` gives `python3-12`.
fn component_name_for(exe: &str) -> String {
    let base = exe.rsplit('/').next().unwrap_or(exe);
    let name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "new-component".to_owned()
    } else {
        name.to_owned()
    }
}

/// Writes a component stub whose selectors match `process`, with `extra` lines appended under it.
/// `zone` names the zone when one is known. Otherwise the stub lists the choices in a comment.
pub(crate) fn component_stub(
    model: &Model,
    process: &ProcessInfo,
    zone: Option<&str>,
    extra: &str,
) -> (String, String) {
    let id = component_name_for(&process.exe);
    let zone_line = match zone {
        Some(zone) => format!("    zone: {zone}\n"),
        None => {
            let choices: Vec<&str> = model.zones.iter().map(|z| z.id.as_str()).collect();
            format!("    zone: <zone>  # one of: {}\n", choices.join(", "))
        }
    };
    let mut selectors = format!("exe: [{}]", quote(&glob_literal(&process.exe)));
    if let Some(labels) = workload_labels(process) {
        // A container's cgroup path ends in its id, which the next deployment changes; the
        // workload's labels do not.
        selectors.push_str(&labels);
    } else if !process.cgroup.is_empty() && process.cgroup != "/" {
        selectors.push_str(&format!(", cgroup: [{}]", quote(&glob_literal(&process.cgroup))));
    }
    let stub =
        format!("components:\n  - id: {id}\n{zone_line}    match: {{ {selectors} }}\n{extra}");
    (id, stub)
}

/// Returns the label selector that names a container's workload, such as `, pod: { app: "web" }`:
/// the pod's `app.kubernetes.io/name` or `app` label, else the container's
/// `com.docker.compose.service` label. `None` when the process has none of them.
fn workload_labels(process: &ProcessInfo) -> Option<String> {
    let container = process.container.as_deref()?;
    for key in ["app.kubernetes.io/name", "app"] {
        if let Some(value) = container.pod_labels().and_then(|labels| labels.get(key)) {
            return Some(format!(", pod: {{ {}: {} }}", quote(key), quote(value)));
        }
    }
    let key = "com.docker.compose.service";
    let value = container.labels().and_then(|labels| labels.get(key))?;
    Some(format!(", container: {{ {}: {} }}", quote(key), quote(value)))
}

pub(crate) fn executables_resolution(component: &Component, exe: &str) -> String {
    let mut patterns = component.executable_patterns().to_vec();
    patterns.push(glob_literal(exe));
    format!(
        "components:\n  - id: {}\n    executables: {}\n",
        component.id,
        quoted_list(&patterns)
    )
}

fn listen_entry(protocol: Protocol, port: u16, address: Option<IpAddr>) -> String {
    let mut entry = format!("{{ port: {port}");
    if protocol == Protocol::Udp {
        entry.push_str(", proto: udp");
    }
    if let Some(address) = address {
        entry.push_str(&format!(", address: {}", quote(&address.to_string())));
    }
    entry.push_str(" }");
    entry
}

/// Writes the component's `listens` with the observed one added. A specific bind address is kept,
/// so the declaration does not widen what is allowed.
pub(crate) fn listens_resolution(
    component: &Component,
    protocol: Protocol,
    addr: SocketAddr,
) -> String {
    let mut entries: Vec<String> = component
        .listens
        .iter()
        .map(|l| listen_entry(l.protocol, l.port, l.address))
        .collect();
    let address = (!addr.ip().is_unspecified()).then(|| addr.ip().to_canonical());
    entries.push(listen_entry(protocol, addr.port(), address));
    format!(
        "components:\n  - id: {}\n    listens: [{}]\n",
        component.id,
        entries.join(", ")
    )
}

pub(crate) fn listens_line(protocol: Protocol, addr: SocketAddr) -> String {
    let address = (!addr.ip().is_unspecified()).then(|| addr.ip().to_canonical());
    format!(
        "    listens: [{}]\n",
        listen_entry(protocol, addr.port(), address)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_name_from_executable() {
        assert_eq!(component_name_for("/usr/bin/python3.12"), "python3-12");
        assert_eq!(component_name_for("/usr/bin/curl"), "curl");
        assert_eq!(component_name_for("/"), "new-component");
    }

    #[test]
    fn zone_name_from_address() {
        assert_eq!(
            zone_name_for("198.51.100.7".parse().unwrap()),
            "net-198-51-100-7"
        );
        assert_eq!(
            zone_name_for("2001:db8::1".parse().unwrap()),
            "net-2001-db8--1"
        );
    }
}

#[cfg(test)]
mod glob_literal_tests {
    use super::glob_literal;
    use crate::model::compile_glob;

    #[test]
    fn glob_literal_matches_only_the_path() {
        for path in ["/usr/bin/bash", "/tmp/g[x", "/tmp/s*", "/tmp/{a,b}?", "/tmp/back\\slash"] {
            let glob = compile_glob(&glob_literal(path)).unwrap().compile_matcher();
            assert!(glob.is_match(path), "{path} does not match its own literal");
        }
        let star = compile_glob(&glob_literal("/tmp/s*")).unwrap().compile_matcher();
        assert!(!star.is_match("/tmp/sx"));
    }
}
