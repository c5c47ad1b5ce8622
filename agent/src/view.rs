//! The graph and status the agent returns to the API's calls.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use driftwatch_model::graph::GraphSnapshot;
use driftwatch_model::Model;

use crate::api::server::AgentView;
use crate::api::status::{HookStatus, ModelInfo, StatusSnapshot};
use crate::events::EventHub;
use crate::fleet::push::PushCounters;
use crate::pipeline::Shared;
use crate::reload::ModelReloader;
use crate::telemetry::Telemetry;
use crate::web::{DeclaredModel, LiveSource};

/// Builds [`ModelInfo`] for a model loaded from `path`.
pub fn model_info(path: &Path, model: &Model, loaded_at: SystemTime) -> ModelInfo {
    ModelInfo {
        path: path.to_path_buf(),
        loaded_at,
        zones: model.zones.len(),
        components: model.components.len(),
        flows: model.flows.len(),
    }
}

/// Reads the pipeline, the engine and telemetry for the API.
pub struct AgentStatusView {
    shared: Arc<Shared>,
    telemetry: Arc<Telemetry>,
    model: Mutex<ModelInfo>,
    /// Reloads the model and then describes the model in force, when the agent reloads at all.
    reloader: Option<Arc<ModelReloader>>,
    started_at: SystemTime,
    push: Mutex<Option<Arc<PushCounters>>>,
    events: Option<Arc<EventHub>>,
}

impl AgentStatusView {
    pub fn new(shared: Arc<Shared>, telemetry: Arc<Telemetry>, model: ModelInfo) -> Self {
        AgentStatusView { shared, telemetry, model: Mutex::new(model), reloader: None, started_at: SystemTime::now(), push: Mutex::new(None), events: None }
    }

    /// Adds the collector pusher's counters to the status from now on.
    pub fn attach_push_counters(&self, counters: Arc<PushCounters>) {
        *self.push.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(counters);
    }

    /// Serves `ReloadModel` through `reloader` and reports the model it put in force.
    pub fn with_reloader(mut self, reloader: Arc<ModelReloader>) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// Serves raw events from `events` and adds its counters to the status.
    pub fn with_events(mut self, events: Arc<EventHub>) -> Self {
        self.events = Some(events);
        self
    }

    /// Records the model put in force by a reload.
    pub fn set_model(&self, model: ModelInfo) {
        *self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = model;
    }
}

impl AgentView for AgentStatusView {
    fn graph(&self) -> GraphSnapshot {
        self.shared.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).graph_snapshot()
    }

    fn status(&self) -> StatusSnapshot {
        let hooks = self
            .telemetry
            .hooks()
            .into_iter()
            .map(|hook| HookStatus { name: hook.name.to_string(), attached: hook.attached, error: hook.error.clone() })
            .collect();
        let mut counters = telemetry_counters(&self.telemetry);
        let stats = self.shared.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        counters.extend(stats.named());
        let engine = self.shared.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).stats();
        counters.extend(engine.named());
        if let Some(push) = &*self.push.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) {
            counters.extend(push.named());
        }
        if let Some(events) = &self.events {
            counters.extend(events.counters().named());
        }
        StatusSnapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.started_at,
            hooks,
            counters,
            model: Some(match &self.reloader {
                Some(reloader) => reloader.model_info(),
                None => self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone(),
            }),
        }
    }

    fn model_reloader(&self) -> Option<Arc<ModelReloader>> {
        self.reloader.clone()
    }

    fn event_hub(&self) -> Option<Arc<EventHub>> {
        self.events.clone()
    }
}

impl LiveSource for AgentStatusView {
    fn graph(&self) -> GraphSnapshot {
        AgentView::graph(self)
    }

    fn declared(&self) -> DeclaredModel {
        DeclaredModel::from_model(self.shared.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).model())
    }
}

fn telemetry_counters(telemetry: &Telemetry) -> Vec<(String, u64)> {
    let counters = telemetry.counters();
    let mut named: Vec<(String, u64)> = vec![
        ("telemetry_records_read".to_string(), counters.records_read),
        ("telemetry_events_sent".to_string(), counters.events_sent),
        ("telemetry_channel_drops".to_string(), counters.channel_drops),
        ("telemetry_short_records".to_string(), counters.short_records),
        ("telemetry_unknown_records".to_string(), counters.unknown_records),
        ("telemetry_paired_accepts_swept".to_string(), counters.paired_accepts_swept),
    ];
    for drops in &counters.kernel {
        named.push((format!("kernel_drops_{}_{}", drops.program, drops.reason), drops.total));
        for (cpu, value) in drops.per_cpu.iter().enumerate().filter(|(_, value)| **value > 0) {
            named.push((format!("kernel_drops_{}_{}_cpu{cpu}", drops.program, drops.reason), *value));
        }
    }
    named
}
