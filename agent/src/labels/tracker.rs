//! The pipeline's side of label lookups: a bounded cache of container identities keyed by
//! container id, with negative entries, and the requests for what it lacks.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftwatch_model::observation::{ContainerIdentity, LabelsState, PodIdentity};
use tokio::sync::mpsc;

use super::{runtime_name, LabelReply, LabelRequest, LookupOutcome};
use crate::state::container::{CgroupOrigin, Runtime};

/// Bounds and retry delays of the tracker.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Containers remembered, found or not. When full, the entry added first goes.
    pub capacity: usize,
    /// How long a container the runtime did not know stays unknown before it is asked again.
    pub not_found_retry: Duration,
    /// How long after a failed lookup a container is asked again.
    pub failure_retry: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            capacity: 8192,
            not_found_retry: Duration::from_secs(30),
            failure_retry: Duration::from_secs(5),
        }
    }
}

/// Counters of label lookups, for the status call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelStats {
    /// Lookups handed to the lookup task.
    pub requests: u64,
    /// Lookups not handed over because the request channel was full; retried at the container's
    /// next event.
    pub requests_dropped: u64,
    pub found: u64,
    pub not_found: u64,
    /// Lookups that failed: socket missing, timeout, error reply.
    pub failures: u64,
    /// Containers of a runtime that no configured source serves.
    pub no_source: u64,
    /// Entries removed to stay within the capacity.
    pub evicted: u64,
    /// Containers in the cache now.
    pub entries: u64,
    /// Lookups requested whose reply has not arrived.
    pub in_flight: u64,
}

struct Entry {
    identity: Arc<ContainerIdentity>,
    runtime: Runtime,
    in_flight: bool,
    /// When a negative entry may be asked about again; `None` for a final answer.
    retry_at: Option<Instant>,
    generation: u64,
}

/// Container identities by container id. Owned by the pipeline task, so it needs no lock.
pub struct LabelTracker {
    config: TrackerConfig,
    entries: HashMap<String, Entry>,
    /// Container ids in insertion order with their generation, for eviction.
    order: VecDeque<(String, u64)>,
    next_generation: u64,
    /// `None` when no label source is configured: identities then carry ids but never labels.
    requests: Option<mpsc::Sender<LabelRequest>>,
    stats: LabelStats,
}

impl LabelTracker {
    pub fn new(config: TrackerConfig, requests: Option<mpsc::Sender<LabelRequest>>) -> LabelTracker {
        LabelTracker {
            config,
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_generation: 0,
            requests,
            stats: LabelStats::default(),
        }
    }

    /// Returns the identity of the container that `origin` names, or `None` outside containers.
    ///
    /// A container seen for the first time, or a negative entry whose retry delay has passed, is
    /// requested from the lookup task; meanwhile the identity carries the id and pod uid only.
    pub fn identity(&mut self, origin: &CgroupOrigin, now: Instant) -> Option<Arc<ContainerIdentity>> {
        let (runtime, id) = origin.container.as_ref()?;
        let retry = match self.entries.get(id) {
            Some(entry) => !entry.in_flight && entry.retry_at.is_some_and(|at| now >= at),
            None => {
                self.insert(id, *runtime, origin.pod_uid.clone());
                true
            }
        };
        if retry {
            self.request(id, now);
        }
        self.entries.get(id).map(|entry| entry.identity.clone())
    }

    /// Returns the identity known now for a container id.
    pub fn current(&self, container_id: &str) -> Option<&Arc<ContainerIdentity>> {
        self.entries.get(container_id).map(|entry| &entry.identity)
    }

    /// True when a lookup for the container was requested and has not returned.
    pub fn is_in_flight(&self, container_id: &str) -> bool {
        self.entries.get(container_id).is_some_and(|entry| entry.in_flight)
    }

    /// Applies the outcome of a lookup and returns the container's new identity, or `None` when
    /// the entry was evicted meanwhile.
    pub fn apply(&mut self, reply: LabelReply, now: Instant) -> Option<Arc<ContainerIdentity>> {
        let config = self.config.clone();
        let entry = self.entries.get_mut(&reply.container_id)?;
        if entry.in_flight {
            entry.in_flight = false;
            self.stats.in_flight = self.stats.in_flight.saturating_sub(1);
        }
        let mut identity = ContainerIdentity::clone(&entry.identity);
        match reply.outcome {
            LookupOutcome::Found(metadata) => {
                self.stats.found += 1;
                identity.name = metadata.name;
                identity.labels = Some(metadata.labels);
                identity.labels_state = LabelsState::Resolved;
                if let Some(pod) = metadata.pod {
                    // The cgroup path's uid wins when both are present; they agree on a sane node.
                    let uid = identity.pod.as_ref().map(|known| known.uid.clone()).unwrap_or(pod.uid);
                    identity.pod = Some(PodIdentity {
                        uid,
                        namespace: pod.namespace,
                        name: pod.name,
                        labels: Some(pod.labels),
                    });
                }
                entry.retry_at = None;
            }
            LookupOutcome::NotFound => {
                self.stats.not_found += 1;
                identity.labels_state = LabelsState::NotFound;
                entry.retry_at = Some(now + config.not_found_retry);
            }
            LookupOutcome::Failed(_) => {
                self.stats.failures += 1;
                identity.labels_state = LabelsState::Failed;
                entry.retry_at = Some(now + config.failure_retry);
            }
            LookupOutcome::NoSource => {
                self.stats.no_source += 1;
                identity.labels_state = LabelsState::Pending;
                entry.retry_at = None;
            }
        }
        entry.identity = Arc::new(identity);
        Some(entry.identity.clone())
    }

    pub fn stats(&self) -> LabelStats {
        LabelStats { entries: self.entries.len() as u64, ..self.stats.clone() }
    }

    fn insert(&mut self, id: &str, runtime: Runtime, pod_uid: Option<String>) {
        while self.entries.len() >= self.config.capacity.max(1) {
            let Some((oldest, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&oldest).is_some_and(|entry| entry.generation == generation) {
                if let Some(entry) = self.entries.remove(&oldest) {
                    if entry.in_flight {
                        self.stats.in_flight = self.stats.in_flight.saturating_sub(1);
                    }
                }
                self.stats.evicted += 1;
            }
        }
        self.next_generation += 1;
        let identity = ContainerIdentity {
            id: id.to_string(),
            runtime: runtime_name(runtime).to_string(),
            name: String::new(),
            labels: None,
            labels_state: LabelsState::Pending,
            pod: pod_uid.map(|uid| PodIdentity { uid, namespace: String::new(), name: String::new(), labels: None }),
        };
        let entry = Entry {
            identity: Arc::new(identity),
            runtime,
            in_flight: false,
            retry_at: None,
            generation: self.next_generation,
        };
        self.entries.insert(id.to_string(), entry);
        self.order.push_back((id.to_string(), self.next_generation));
    }

    fn request(&mut self, id: &str, now: Instant) {
        let Some(requests) = &self.requests else { return };
        let Some(entry) = self.entries.get_mut(id) else { return };
        let request = LabelRequest { container_id: id.to_string(), runtime: entry.runtime };
        match requests.try_send(request) {
            Ok(()) => {
                entry.in_flight = true;
                entry.retry_at = None;
                self.stats.requests += 1;
                self.stats.in_flight += 1;
            }
            Err(_) => {
                // Asked again at the container's next event.
                entry.retry_at = Some(now);
                self.stats.requests_dropped += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{ContainerMetadata, PodMetadata};
    use std::collections::BTreeMap;

    const POD: &str = "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d";

    fn container_id(n: u8) -> String {
        format!("{:064x}", n)
    }

    fn origin(runtime: Runtime, n: u8, pod: bool) -> CgroupOrigin {
        CgroupOrigin {
            systemd_unit: None,
            container: Some((runtime, container_id(n))),
            pod_uid: pod.then(|| POD.to_string()),
        }
    }

    fn tracker(capacity: usize, channel: usize) -> (LabelTracker, mpsc::Receiver<LabelRequest>) {
        let (sender, receiver) = mpsc::channel(channel);
        let config = TrackerConfig { capacity, ..TrackerConfig::default() };
        (LabelTracker::new(config, Some(sender)), receiver)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn first_sighting_requests_once() {
        let (mut tracker, mut requests) = tracker(16, 16);
        let now = Instant::now();
        let first = tracker.identity(&origin(Runtime::Containerd, 1, true), now).unwrap();
        let second = tracker.identity(&origin(Runtime::Containerd, 1, true), now).unwrap();
        assert_eq!(first.id, container_id(1));
        assert_eq!(first.runtime, "containerd");
        assert_eq!(first.labels_state, LabelsState::Pending);
        assert_eq!(first.pod.as_ref().map(|pod| pod.uid.as_str()), Some(POD));
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(requests.try_recv().unwrap(), LabelRequest { container_id: container_id(1), runtime: Runtime::Containerd });
        assert!(requests.try_recv().is_err());
        assert!(tracker.is_in_flight(&container_id(1)));
        assert_eq!(tracker.stats().requests, 1);
    }

    #[test]
    fn found_reply_fills_container_and_pod() {
        let (mut tracker, _requests) = tracker(16, 16);
        let now = Instant::now();
        tracker.identity(&origin(Runtime::Containerd, 1, true), now);
        let metadata = ContainerMetadata {
            name: "api".to_string(),
            labels: labels(&[("tier", "back")]),
            pod: Some(PodMetadata {
                uid: POD.to_string(),
                namespace: "shop".to_string(),
                name: "api-7d9f".to_string(),
                labels: labels(&[("app", "api")]),
            }),
        };
        let reply = LabelReply { container_id: container_id(1), outcome: LookupOutcome::Found(metadata) };
        let identity = tracker.apply(reply, now).unwrap();
        assert_eq!(identity.name, "api");
        assert_eq!(identity.labels, Some(labels(&[("tier", "back")])));
        assert_eq!(identity.labels_state, LabelsState::Resolved);
        let pod = identity.pod.as_ref().unwrap();
        assert_eq!(pod.namespace, "shop");
        assert_eq!(pod.name, "api-7d9f");
        assert_eq!(pod.labels, Some(labels(&[("app", "api")])));
        assert!(!tracker.is_in_flight(&container_id(1)));
        assert_eq!(tracker.stats().found, 1);
        assert_eq!(tracker.stats().in_flight, 0);
    }

    #[test]
    fn negative_entry_waits_for_its_retry_delay() {
        let (mut tracker, mut requests) = tracker(16, 16);
        let now = Instant::now();
        tracker.identity(&origin(Runtime::Docker, 2, false), now);
        requests.try_recv().unwrap();
        let reply = LabelReply { container_id: container_id(2), outcome: LookupOutcome::Failed("down".to_string()) };
        let identity = tracker.apply(reply, now).unwrap();
        assert_eq!(identity.labels_state, LabelsState::Failed);
        assert_eq!(identity.labels, None);

        // Within the retry delay the failure is served from the cache without a new request.
        let cached = tracker.identity(&origin(Runtime::Docker, 2, false), now + Duration::from_secs(1)).unwrap();
        assert_eq!(cached.labels_state, LabelsState::Failed);
        assert!(requests.try_recv().is_err());

        tracker.identity(&origin(Runtime::Docker, 2, false), now + Duration::from_secs(6));
        assert_eq!(requests.try_recv().unwrap().container_id, container_id(2));
        assert_eq!(tracker.stats().failures, 1);
        assert_eq!(tracker.stats().requests, 2);
    }

    #[test]
    fn not_found_is_cached_longer_than_a_failure() {
        let (mut tracker, mut requests) = tracker(16, 16);
        let now = Instant::now();
        tracker.identity(&origin(Runtime::Docker, 3, false), now);
        requests.try_recv().unwrap();
        tracker.apply(LabelReply { container_id: container_id(3), outcome: LookupOutcome::NotFound }, now);
        tracker.identity(&origin(Runtime::Docker, 3, false), now + Duration::from_secs(6));
        assert!(requests.try_recv().is_err());
        tracker.identity(&origin(Runtime::Docker, 3, false), now + Duration::from_secs(31));
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn full_cache_evicts_the_oldest_entry() {
        let (mut tracker, _requests) = tracker(2, 16);
        let now = Instant::now();
        for n in 1..=3 {
            tracker.identity(&origin(Runtime::Docker, n, false), now);
        }
        assert!(tracker.current(&container_id(1)).is_none());
        assert!(tracker.current(&container_id(2)).is_some());
        assert!(tracker.current(&container_id(3)).is_some());
        let stats = tracker.stats();
        assert_eq!(stats.evicted, 1);
        assert_eq!(stats.entries, 2);
        assert_eq!(stats.in_flight, 2);
        // A reply for the evicted container changes nothing.
        let late = LabelReply { container_id: container_id(1), outcome: LookupOutcome::NotFound };
        assert!(tracker.apply(late, now).is_none());
    }

    #[test]
    fn full_request_channel_is_counted_and_retried() {
        let (mut tracker, mut requests) = tracker(16, 1);
        let now = Instant::now();
        tracker.identity(&origin(Runtime::Docker, 1, false), now);
        tracker.identity(&origin(Runtime::Docker, 2, false), now);
        assert_eq!(tracker.stats().requests_dropped, 1);
        assert!(!tracker.is_in_flight(&container_id(2)));
        requests.try_recv().unwrap();
        tracker.identity(&origin(Runtime::Docker, 2, false), now + Duration::from_millis(1));
        assert_eq!(requests.try_recv().unwrap().container_id, container_id(2));
        assert!(tracker.is_in_flight(&container_id(2)));
    }

    #[test]
    fn processes_outside_containers_have_no_identity() {
        let (mut tracker, mut requests) = tracker(16, 16);
        let origin = CgroupOrigin { systemd_unit: Some("nginx.service".to_string()), container: None, pod_uid: None };
        assert!(tracker.identity(&origin, Instant::now()).is_none());
        assert!(requests.try_recv().is_err());
    }
}
