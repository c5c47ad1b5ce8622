//! The `driftwatch` subcommands, one module each; `main.rs` only parses and dispatches.

pub mod agent;
pub mod check;
pub mod collector;
pub mod diff;
pub mod graph;
pub mod model;
pub mod reload;
pub mod status;
pub mod watch;
mod watch_events;
mod watch_filter;

use std::path::Path;

use driftwatch_model::error::{ModelErrorKind, ModelErrors};

/// Returns the line that closes the errors of a model that failed to load, such as "error: the
/// model m.yaml cannot be read; the agent did not start". A file that could not be read is
/// not called invalid, because its content was never checked.
pub(crate) fn model_failure_summary(path: &Path, errors: &ModelErrors, program: &str) -> String {
    let unreadable = errors.iter().all(|error| matches!(error.kind, ModelErrorKind::Io(_)));
    let problem = if unreadable { "cannot be read" } else { "is invalid" };
    format!("error: the model {} {problem}; the {program} did not start", path.display())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use driftwatch_model::Model;

    use super::model_failure_summary;

    #[test]
    fn missing_model_is_not_called_invalid() {
        let path = Path::new("/nonexistent/driftwatch-hL/missing.yaml");
        let errors = Model::load(path).unwrap_err();

        assert_eq!(
            model_failure_summary(path, &errors, "collector"),
            "error: the model /nonexistent/driftwatch-hL/missing.yaml cannot be read; the collector did not start"
        );
    }

    #[test]
    fn unparsable_model_is_called_invalid() {
        let errors = Model::parse("version: [", "bad.yaml").unwrap_err();

        assert_eq!(
            model_failure_summary(Path::new("bad.yaml"), &errors, "agent"),
            "error: the model bad.yaml is invalid; the agent did not start"
        );
    }
}
