//! The deployment files: the systemd unit and the Kubernetes manifests are parsed and checked
//! against the binary they run. Every flag they pass must exist in the binary's `--help`, the ports
//! and paths they wire together must agree, and the agent must get the capabilities and host
//! mounts it needs without running privileged. `systemd-analyze verify` checks the unit when it is
//! installed. Needs `DRIFTWATCH_BIN` (set by `cargo xtask test`), but not root.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use driftwatch_e2e::driftwatch_bin;
use saphyr::{LoadableYamlNode, ScalarOwned, YamlOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Returns the `--flag` names that `driftwatch <subcommand> --help` lists, or `None` when the
/// binary has no such subcommand.
fn help_flags(subcommand: &str) -> Option<BTreeSet<String>> {
    let output = Command::new(driftwatch_bin().unwrap())
        .args([subcommand, "--help"])
        .output()
        .expect("run driftwatch --help");
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).unwrap();
    let flags = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(|word| word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_string())
        .collect();
    Some(flags)
}

/// Splits `--name=value` and `--name value` arguments into (name, value) pairs, in order.
fn flag_values(args: &[String]) -> Vec<(String, Option<String>)> {
    let mut pairs = Vec::new();
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        let Some(flag) = arg.strip_prefix("--") else { continue };
        match flag.split_once('=') {
            Some((name, value)) => pairs.push((name.to_string(), Some(value.to_string()))),
            None => {
                let value = iter.next_if(|next| !next.starts_with("--")).cloned();
                pairs.push((flag.to_string(), value));
            }
        }
    }
    pairs
}

fn flag<'a>(pairs: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(flag, _)| flag == name)
        .and_then(|(_, value)| value.as_deref())
}

fn assert_flags_exist(pairs: &[(String, Option<String>)], known: &BTreeSet<String>, file: &str) {
    for (name, _) in pairs {
        // --log-format is global, so the subcommand's help lists it too.
        assert!(known.contains(&format!("--{name}")), "{file} passes --{name}, which `--help` does not list");
    }
}

/// Returns the unit's directives as (key, value), continuation lines joined.
fn unit_directives(text: &str) -> Vec<(String, String)> {
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

fn directive<'a>(directives: &'a [(String, String)], key: &str) -> &'a str {
    directives
        .iter()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
        .unwrap_or_else(|| panic!("the unit has no {key}="))
}

#[test]
fn systemd_unit_runs_existing_flags_with_hardening() {
    let path = deploy_dir().join("systemd/driftwatch-agent.service");
    let text = fs::read_to_string(&path).unwrap();
    let directives = unit_directives(&text);

    let exec: Vec<String> = directive(&directives, "ExecStart").split_whitespace().map(String::from).collect();
    assert_eq!(exec[0], "/usr/local/bin/driftwatch");
    assert_eq!(exec[1], "agent");
    let pairs = flag_values(&exec[2..]);
    assert_flags_exist(&pairs, &help_flags("agent").unwrap(), "the unit's ExecStart");

    // The socket and the JSON lines live in the directories systemd creates for the unit.
    let runtime = directive(&directives, "RuntimeDirectory");
    assert_eq!(flag(&pairs, "api"), Some(format!("unix:/run/{runtime}/api.sock").as_str()));
    let logs = directive(&directives, "LogsDirectory");
    assert!(flag(&pairs, "jsonl").unwrap().starts_with(&format!("/var/log/{logs}/")));
    assert!(flag(&pairs, "metrics").unwrap().starts_with("127.0.0.1:"), "metrics stay on loopback");

    let capabilities: BTreeSet<&str> = directive(&directives, "CapabilityBoundingSet").split_whitespace().collect();
    for needed in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"] {
        assert!(capabilities.contains(needed), "CapabilityBoundingSet lacks {needed}");
    }
    let filter: BTreeSet<&str> = directive(&directives, "SystemCallFilter").split_whitespace().collect();
    for needed in ["bpf", "perf_event_open", "@system-service"] {
        assert!(filter.contains(needed), "SystemCallFilter lacks {needed}");
    }
    assert_eq!(directive(&directives, "NoNewPrivileges"), "yes");
    assert_eq!(directive(&directives, "ProtectSystem"), "strict");
    assert_eq!(directive(&directives, "LimitMEMLOCK"), "infinity");
    assert_eq!(directive(&directives, "ExecReload"), "/bin/kill -HUP $MAINPID");
}

#[test]
fn systemd_analyze_verifies_unit() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed; the unit is checked by systemd_unit_runs_existing_flags_with_hardening only");
        return;
    };
    assert!(version.status.success());

    // verify checks that ExecStart's binary exists, so the copy points at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(deploy_dir().join("systemd/driftwatch-agent.service")).unwrap();
    let bin = driftwatch_bin().unwrap();
    let unit = dir.path().join("driftwatch-agent.service");
    fs::write(&unit, text.replace("/usr/local/bin/driftwatch", bin.to_str().unwrap())).unwrap();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Units this one orders itself after may be missing where systemd is not the init system.
    // verify reports them, but they are no fault of this file.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("driftwatch-agent.service"))
        .filter(|line| !line.contains("sys-kernel-tracing.mount"))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify:\n{stderr}");
}

/// Converts a YAML node into JSON, so that tests can index it.
fn to_json(node: &YamlOwned) -> Value {
    match node {
        YamlOwned::Value(scalar) => match scalar {
            ScalarOwned::Null => Value::Null,
            ScalarOwned::Boolean(value) => Value::from(*value),
            ScalarOwned::Integer(value) => Value::from(*value),
            ScalarOwned::FloatingPoint(value) => Value::from(value.into_inner()),
            ScalarOwned::String(value) => Value::from(value.as_str()),
        },
        YamlOwned::Representation(text, ..) => Value::from(text.as_str()),
        YamlOwned::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        YamlOwned::Mapping(entries) => Value::Object(
            entries
                .iter()
                .map(|(key, value)| {
                    let key = match to_json(key) {
                        Value::String(key) => key,
                        other => other.to_string(),
                    };
                    (key, to_json(value))
                })
                .collect(),
        ),
        YamlOwned::Tagged(_, inner) => to_json(inner),
        other => panic!("unexpected YAML node {other:?}"),
    }
}

/// Parses every document of every manifest, keyed by (kind, name).
fn manifests() -> BTreeMap<(String, String), Value> {
    let mut objects = BTreeMap::new();
    for entry in fs::read_dir(deploy_dir().join("kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let documents = YamlOwned::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for document in documents {
            let object = to_json(&document);
            let kind = object["kind"].as_str().unwrap().to_string();
            let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
            let previous = objects.insert((kind.clone(), name.clone()), object);
            assert!(previous.is_none(), "{kind} {name} is declared twice");
        }
    }
    objects
}

fn object<'a>(objects: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    objects
        .get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/kubernetes"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().map(|item| item.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Returns the container port named `name`.
fn container_port(container: &Value, name: &str) -> i64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|port| port["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_i64()
        .unwrap()
}

/// Returns the host path mounted at `mount_path`, or the volume's description when it is not a
/// host path.
fn mounted_volume<'a>(pod: &'a Value, container: &Value, mount_path: &str) -> &'a Value {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("nothing is mounted at {mount_path}"));
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .unwrap_or_else(|| panic!("the volume {} mounted at {mount_path} is not declared", mount["name"]))
}

#[test]
fn agent_daemonset_has_minimal_capabilities_and_host_mounts() {
    let objects = manifests();
    let daemonset = object(&objects, "DaemonSet", "driftwatch-agent");
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let security = &container["securityContext"];

    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), vec!["ALL"]);
    let added: BTreeSet<String> = strings(&security["capabilities"]["add"]).into_iter().collect();
    for needed in ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"] {
        assert!(added.contains(needed), "the agent lacks CAP_{needed}");
    }
    assert!(!added.contains("SYS_ADMIN"), "the agent needs no CAP_SYS_ADMIN on kernels with CAP_BPF");
    assert_eq!(pod["hostPID"], true, "the agent reads the host's /proc");

    for path in ["/sys/fs/cgroup", "/sys/kernel/tracing"] {
        let volume = mounted_volume(pod, container, path);
        assert_eq!(volume["hostPath"]["path"], path, "{path} comes from the host");
    }

    let args = strings(&container["args"]);
    assert_eq!(args[0], "agent");
    let pairs = flag_values(&args[1..]);
    assert_flags_exist(&pairs, &help_flags("agent").unwrap(), "the DaemonSet's args");

    let metrics_port = port_of(flag(&pairs, "metrics").unwrap());
    assert_eq!(container_port(container, "metrics"), metrics_port);
    let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], metrics_port.to_string());

    // The API socket's directory is a host path, so clients on the node reach it.
    let socket = flag(&pairs, "api").unwrap().strip_prefix("unix:").unwrap();
    let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    assert_eq!(mounted_volume(pod, container, socket_dir)["hostPath"]["path"], socket_dir);

    let account = pod["serviceAccountName"].as_str().unwrap();
    object(&objects, "ServiceAccount", account);
}

#[test]
fn agent_daemonset_model_comes_from_valid_configmap() {
    let objects = manifests();
    let pod = &object(&objects, "DaemonSet", "driftwatch-agent")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let pairs = flag_values(&strings(&container["args"])[1..]);
    let model = Path::new(flag(&pairs, "model").unwrap());

    let volume = mounted_volume(pod, container, model.parent().unwrap().to_str().unwrap());
    let configmap_name = volume["configMap"]["name"].as_str().unwrap();
    let configmap = object(&objects, "ConfigMap", configmap_name);
    let key = model.file_name().unwrap().to_str().unwrap();
    let text = configmap["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap {configmap_name} has no key {key}"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(key);
    fs::write(&file, text).unwrap();
    let output = Command::new(driftwatch_bin().unwrap()).args(["model", "validate"]).arg(&file).output().unwrap();
    assert!(
        output.status.success(),
        "the ConfigMap's model is invalid:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn collector_service_reaches_its_listener() {
    let objects = manifests();
    let deployment = object(&objects, "Deployment", "driftwatch-collector");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = strings(&container["args"]);
    assert_eq!(args[0], "collector");
    let pairs = flag_values(&args[1..]);

    let listen_port = port_of(flag(&pairs, "listen").unwrap());
    assert_eq!(container_port(container, "grpc"), listen_port);
    let service = object(&objects, "Service", "driftwatch-collector");
    assert_eq!(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["targetPort"], "grpc");
    assert_eq!(service_port["port"], listen_port);

    // Mutual TLS on a port that crosses the network.
    for name in ["tls-cert", "tls-key", "tls-client-ca"] {
        assert!(flag(&pairs, name).is_some(), "the collector runs without --{name}");
    }
    assert_eq!(container["securityContext"]["privileged"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    object(&objects, "ServiceAccount", pod["serviceAccountName"].as_str().unwrap());

    assert_flags_exist(&pairs, &help_flags("collector").unwrap(), "the collector's args");
}

#[test]
fn agent_daemonset_pushes_with_mutual_tls() {
    let objects = manifests();
    let pod = &object(&objects, "DaemonSet", "driftwatch-agent")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = strings(&container["args"]);
    let pairs = flag_values(&args[1..]);

    // The collector's address is its Service's DNS name and port.
    let (host, port) = flag(&pairs, "collector").unwrap().rsplit_once(':').unwrap();
    let service = object(&objects, "Service", "driftwatch-collector");
    let expected_host = format!("{}.{}.svc", service["metadata"]["name"].as_str().unwrap(), service["metadata"]["namespace"].as_str().unwrap());
    assert_eq!(host, expected_host);
    assert_eq!(port.parse::<i64>().unwrap(), service["spec"]["ports"][0]["port"].as_i64().unwrap());

    // Each TLS file is a key of a mounted Secret.
    for (name, key) in [("collector-tls-ca", "ca.crt"), ("collector-tls-cert", "tls.crt"), ("collector-tls-key", "tls.key")] {
        let path = Path::new(flag(&pairs, name).unwrap_or_else(|| panic!("the agent runs without --{name}")));
        assert_eq!(path.file_name().unwrap(), key, "--{name}");
        let volume = mounted_volume(pod, container, path.parent().unwrap().to_str().unwrap());
        assert!(volume["secret"]["secretName"].is_string(), "--{name} is not read from a Secret: {volume}");
    }

    // Every $(VAR) in the arguments is set in the container's environment, or the kubelet would
    // pass it on literally.
    let env: BTreeSet<String> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|variable| variable["name"].as_str().unwrap().to_string())
        .collect();
    for arg in &args {
        for reference in arg.split("$(").skip(1) {
            let name = reference.split(')').next().unwrap();
            assert!(env.contains(name), "{arg} names ${name}, which the container does not set");
        }
    }
    assert_eq!(flag(&pairs, "node"), Some("$(NODE_NAME)"));
}

#[test]
fn collector_deployment_serves_view_and_metrics() {
    let objects = manifests();
    let deployment = object(&objects, "Deployment", "driftwatch-collector");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let pairs = flag_values(&strings(&container["args"])[1..]);

    let metrics_port = port_of(flag(&pairs, "metrics").unwrap());
    assert_eq!(container_port(container, "metrics"), metrics_port);
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], metrics_port.to_string());

    // The view has no authentication, so it stays on the pod's loopback (kubectl port-forward).
    assert!(flag(&pairs, "web").unwrap().starts_with("127.0.0.1:"));

    // The collector reads the model the agents load.
    let model = Path::new(flag(&pairs, "model").unwrap());
    let volume = mounted_volume(pod, container, model.parent().unwrap().to_str().unwrap());
    let agent_pod = &object(&objects, "DaemonSet", "driftwatch-agent")["spec"]["template"]["spec"];
    let agent_container = &agent_pod["containers"][0];
    let agent_model = Path::new(flag(&flag_values(&strings(&agent_container["args"])[1..]), "model").unwrap()).to_path_buf();
    let agent_volume = mounted_volume(agent_pod, agent_container, agent_model.parent().unwrap().to_str().unwrap());
    assert_eq!(volume["configMap"]["name"], agent_volume["configMap"]["name"]);
    assert_eq!(model.file_name(), agent_model.file_name());
}

#[test]
fn manifests_share_one_namespace_and_kustomization_lists_them() {
    let objects = manifests();
    object(&objects, "Namespace", "driftwatch");
    for ((kind, name), value) in &objects {
        if matches!(kind.as_str(), "Namespace" | "Kustomization") {
            continue;
        }
        assert_eq!(value["metadata"]["namespace"], "driftwatch", "{kind} {name}");
    }

    let kustomization = object(&objects, "Kustomization", "");
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let files: BTreeSet<String> = fs::read_dir(deploy_dir().join("kubernetes"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}
