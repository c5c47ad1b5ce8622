//! `driftwatch model ...`: work with model files without an agent.

use std::path::PathBuf;
use std::process::ExitCode;

use driftwatch_model::Model;

/// Subcommands of `driftwatch model`.
#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// Check a model file and print every error with its file, line and column.
    Validate(ValidateArgs),
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// The model file (YAML).
    pub file: PathBuf,
}

pub fn run(command: ModelCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Validate(args) => validate(&args),
    }
}

fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    match Model::load(&args.file) {
        Ok(model) => {
            // Warnings do not make the model invalid: the agent would load it as it is.
            for warning in model.warnings(std::time::SystemTime::now()) {
                eprintln!("{warning}");
                eprintln!("  hint: {}", warning.hint);
            }
            println!(
                "{}: valid (version {}, {} zones, {} components, {} flows, {} exceptions)",
                args.file.display(),
                model.version,
                model.zones.len(),
                model.components.len(),
                model.flows.len(),
                model.exceptions.len(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
                if let Some(hint) = error.kind.hint() {
                    eprintln!("  hint: {hint}");
                }
            }
            eprintln!("{}: invalid model ({} errors)", args.file.display(), errors.len());
            Ok(ExitCode::from(2))
        }
    }
}
