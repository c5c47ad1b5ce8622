//! Conversions of a process's container and pod identity to and from the driftwatch.v1
//! `ProcessInfo` fields 20 to 28.

use std::collections::BTreeMap;
use std::sync::Arc;

use driftwatch_model::observation::{ContainerIdentity, LabelsState, PodIdentity};
use driftwatch_proto::v1 as pb;

/// Returns a `ProcessInfo` whose container and pod fields describe `container` and whose other
/// fields are empty, for use as the base of a struct update.
pub(super) fn container_to_proto(container: Option<&ContainerIdentity>) -> pb::ProcessInfo {
    let Some(container) = container else {
        return pb::ProcessInfo::default();
    };
    let pod = container.pod.as_ref();
    pb::ProcessInfo {
        container_id: container.id.clone(),
        container_runtime: container.runtime.clone(),
        container_name: container.name.clone(),
        container_labels: to_map(container.labels.as_ref()),
        container_labels_state: labels_state_to_proto(container.labels_state) as i32,
        pod_uid: pod.map(|pod| pod.uid.clone()).unwrap_or_default(),
        pod_namespace: pod.map(|pod| pod.namespace.clone()).unwrap_or_default(),
        pod_name: pod.map(|pod| pod.name.clone()).unwrap_or_default(),
        pod_labels: to_map(pod.and_then(|pod| pod.labels.as_ref())),
        ..pb::ProcessInfo::default()
    }
}

/// Reads the container and pod fields back; `None` when the message names no container.
pub(super) fn container_from_proto(process: &pb::ProcessInfo) -> Option<Arc<ContainerIdentity>> {
    if process.container_id.is_empty() {
        return None;
    }
    let labels_state = match pb::ContainerLabelsState::try_from(process.container_labels_state) {
        Ok(pb::ContainerLabelsState::Resolved) => LabelsState::Resolved,
        Ok(pb::ContainerLabelsState::NotFound) => LabelsState::NotFound,
        Ok(pb::ContainerLabelsState::Failed) => LabelsState::Failed,
        // Unspecified, pending, and values from a newer agent all mean the labels are not known.
        _ => LabelsState::Pending,
    };
    let resolved = labels_state == LabelsState::Resolved;
    let from_map = |map: &std::collections::HashMap<String, String>| -> BTreeMap<String, String> {
        map.iter().map(|(name, value)| (name.clone(), value.clone())).collect()
    };
    let pod = (!process.pod_uid.is_empty()).then(|| PodIdentity {
        uid: process.pod_uid.clone(),
        namespace: process.pod_namespace.clone(),
        name: process.pod_name.clone(),
        labels: resolved.then(|| from_map(&process.pod_labels)),
    });
    Some(Arc::new(ContainerIdentity {
        id: process.container_id.clone(),
        runtime: process.container_runtime.clone(),
        name: process.container_name.clone(),
        labels: resolved.then(|| from_map(&process.container_labels)),
        labels_state,
        pod,
    }))
}

fn to_map(labels: Option<&BTreeMap<String, String>>) -> std::collections::HashMap<String, String> {
    labels
        .map(|labels| labels.iter().map(|(name, value)| (name.clone(), value.clone())).collect())
        .unwrap_or_default()
}

fn labels_state_to_proto(state: LabelsState) -> pb::ContainerLabelsState {
    match state {
        LabelsState::Pending => pb::ContainerLabelsState::Pending,
        LabelsState::Resolved => pb::ContainerLabelsState::Resolved,
        LabelsState::NotFound => pb::ContainerLabelsState::NotFound,
        LabelsState::Failed => pb::ContainerLabelsState::Failed,
    }
}
