//! Putting a new model in force while the agent runs.
//!
//! Three triggers reload the model file: SIGHUP, a change of the file on disk, and the API's
//! `ReloadModel` call. All of them go through [`ModelReloader::reload`], which reads and validates
//! the file and hands a valid model to the pipeline task. That task alone feeds the engine, so the
//! new model takes over between two events, and it judges what was already observed against the
//! new model before the next event. An invalid file is rejected with every error, and the model in
//! force stays.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use driftwatch_model::{Model, ModelError, ModelWarning};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::AgentMetrics;
use crate::api::status::ModelInfo;
use crate::pipeline::PipelineCommand;
use crate::view;

mod watch;

pub use watch::watch_model_file;

/// Trigger of a reload, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    Signal,
    FileChange,
    Api,
}

impl ReloadTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadTrigger::Signal => "SIGHUP",
            ReloadTrigger::FileChange => "file change",
            ReloadTrigger::Api => "API",
        }
    }
}

/// The result of one reload.
#[derive(Debug, Clone)]
pub enum ReloadOutcome {
    /// The new model is in force.
    Accepted(AcceptedModel),
    /// The file is invalid; the model described by `in_force` stays.
    Rejected { errors: Vec<ModelError>, in_force: ModelInfo },
    /// The file's content is that of the model in force, so nothing was done.
    Unchanged { info: ModelInfo, digest: String, exceptions: usize },
}

/// A model put in force by a reload.
#[derive(Debug, Clone)]
pub struct AcceptedModel {
    pub info: ModelInfo,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub digest: String,
    pub exceptions: usize,
    /// Deviations the new model raised for what was already observed.
    pub deviations_raised: usize,
    /// Problems that do not make the model invalid, such as an expired exception.
    pub warnings: Vec<ModelWarning>,
}

/// Error that stopped a reload from happening at all.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the pipeline has stopped, so the agent is shutting down and cannot put a model in force")]
    PipelineStopped,
    #[error("failed to read the model file in a worker thread: {0}")]
    Worker(String),
}

/// Reloads one model file into a running pipeline, one reload at a time.
pub struct ModelReloader {
    path: PathBuf,
    commands: mpsc::Sender<PipelineCommand>,
    /// The model in force: its description and the digest of its file.
    in_force: Mutex<(ModelInfo, String)>,
    /// Held for the whole of a reload, so two triggers cannot put models in force out of order.
    serial: tokio::sync::Mutex<()>,
    /// Counts every outcome, once the agent's metrics exist.
    metrics: std::sync::OnceLock<AgentMetrics>,
}

impl ModelReloader {
    /// Creates a reloader for the model file at `path`, whose content `text` the agent loaded
    /// at start-up as `model`.
    pub fn new(path: PathBuf, model: &Model, text: &str, commands: mpsc::Sender<PipelineCommand>) -> ModelReloader {
        let info = view::model_info(&path, model, SystemTime::now());
        ModelReloader { path, commands, in_force: Mutex::new((info, digest(text))), serial: tokio::sync::Mutex::new(()), metrics: std::sync::OnceLock::new() }
    }

    /// Counts the outcome of every reload from now on in `metrics`.
    pub fn count_with(&self, metrics: AgentMetrics) {
        let _ = self.metrics.set(metrics);
    }

    /// Reloads as [`ModelReloader::reload_uncounted`] does and counts the outcome.
    ///
    /// # Errors
    /// As [`ModelReloader::reload_uncounted`].
    pub async fn reload(&self, trigger: ReloadTrigger) -> Result<ReloadOutcome, ReloadError> {
        let outcome = self.reload_uncounted(trigger).await;
        if let Some(metrics) = self.metrics.get() {
            metrics.count_reload(matches!(outcome, Ok(ReloadOutcome::Accepted(_) | ReloadOutcome::Unchanged { .. })));
        }
        outcome
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the description of the model in force.
    pub fn model_info(&self) -> ModelInfo {
        self.in_force.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0.clone()
    }

    /// Returns the SHA-256 of the file of the model in force.
    pub fn digest(&self) -> String {
        self.in_force.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).1.clone()
    }

    /// Reads the model file and, when it is valid, puts it in force and waits until the pipeline
    /// has judged the observed graph against it. A file whose bytes equal those of the model in
    /// force is left alone.
    ///
    /// # Errors
    /// When the pipeline has stopped or the worker reading the file panicked. An invalid file is an
    /// [`ReloadOutcome::Rejected`].
    async fn reload_uncounted(&self, trigger: ReloadTrigger) -> Result<ReloadOutcome, ReloadError> {
        let _serial = self.serial.lock().await;
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Model::load_with_text(path))
            .await
            .map_err(|error| ReloadError::Worker(error.to_string()))?;
        let (model, text) = match loaded {
            Ok(loaded) => loaded,
            Err(errors) => {
                for error in &errors.errors {
                    tracing::error!(%error, "invalid model");
                }
                tracing::error!(
                    model = %self.path.display(),
                    trigger = trigger.as_str(),
                    errors = errors.errors.len(),
                    "model reload rejected; the previous model stays in force"
                );
                return Ok(ReloadOutcome::Rejected { errors: errors.errors, in_force: self.model_info() });
            }
        };

        // Judging the same model again would only raise every standing deviation a second time.
        let digest = digest(&text);
        if digest == self.digest() {
            tracing::info!(model = %self.path.display(), trigger = trigger.as_str(), "model file content is the model in force; nothing to reload");
            return Ok(ReloadOutcome::Unchanged { info: self.model_info(), digest, exceptions: model.exceptions.len() });
        }
        let now = SystemTime::now();
        let info = view::model_info(&self.path, &model, now);
        let warnings = model.warnings(now);
        for warning in &warnings {
            tracing::warn!(%warning, hint = %warning.hint, "model warning");
        }
        let exceptions = model.exceptions.len();

        let (reply, replied) = oneshot::channel();
        let command = PipelineCommand::ReplaceModel { model: Box::new(model), reply };
        self.commands.send(command).await.map_err(|_| ReloadError::PipelineStopped)?;
        let deviations_raised = replied.await.map_err(|_| ReloadError::PipelineStopped)?;

        *self.in_force.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = (info.clone(), digest.clone());
        tracing::info!(
            model = %self.path.display(),
            trigger = trigger.as_str(),
            %digest,
            components = info.components,
            flows = info.flows,
            deviations_raised,
            "model reloaded"
        );
        Ok(ReloadOutcome::Accepted(AcceptedModel { info, digest, exceptions, deviations_raised, warnings }))
    }
}

/// Returns the SHA-256 of `text` in lowercase hex.
pub fn digest(text: &str) -> String {
    let hash = Sha256::digest(text.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in hash {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}
