//! `driftwatch model reload`: ask a running agent to put its model file in force again.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::Context as _;
use driftwatch_proto::v1 as pb;
use pb::reload_model_response::Outcome;

use crate::api::{connect, ListenAddr};

/// Arguments of `driftwatch model reload`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReloadArgs {
    /// Agent API address: unix:/path/to.sock, 127.0.0.1:PORT or [::1]:PORT.
    #[arg(long, value_name = "ADDR", default_value_t = ListenAddr::default())]
    pub api: ListenAddr,
}

/// Requests the reload and prints the outcome. Returns exit code 0 when the agent put the model in
/// force and 2 when it rejected it, like `driftwatch model validate`.
///
/// # Errors
///
/// Fails when the agent cannot be reached, does not reload models, or stdout fails.
pub async fn run(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.api).await?;
    let response = client
        .reload_model(pb::ReloadModelRequest {})
        .await
        .with_context(|| format!("failed to reload the model of the agent at {}", args.api))?
        .into_inner();
    let outcome = response
        .outcome
        .context("the agent's reply names no outcome; it may be newer than this client")?;

    let mut stdout = io::stdout().lock();
    let written = match &outcome {
        Outcome::Accepted(accepted) => write_accepted(&mut stdout, accepted),
        Outcome::Rejected(rejected) => write_rejected(&mut stdout, rejected),
    };
    match written {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
            return Err(err).context("failed to write to stdout")
        }
        _ => {}
    }
    Ok(match outcome {
        Outcome::Accepted(_) => ExitCode::SUCCESS,
        Outcome::Rejected(_) => ExitCode::from(2),
    })
}

/// Writes the model put in force, its digest and counts, and its warnings.
pub fn write_accepted(out: &mut impl Write, accepted: &pb::ModelAccepted) -> io::Result<()> {
    let model = accepted.model.clone().unwrap_or_default();
    if accepted.unchanged {
        writeln!(out, "unchanged {}: its content is the model in force", model.path)?;
    } else {
        writeln!(out, "accepted {}", model.path)?;
    }
    writeln!(out, "  sha256 {}", accepted.digest)?;
    writeln!(
        out,
        "  {} zone(s), {} component(s), {} flow(s), {} exception(s)",
        model.zones, model.components, model.flows, accepted.exceptions
    )?;
    writeln!(
        out,
        "  {} deviation(s) raised by judging what was already observed against it",
        accepted.deviations_raised
    )?;
    for warning in &accepted.warnings {
        writeln!(out, "{warning}")?;
    }
    Ok(())
}

/// Writes every error with its place and hint, then the model that stays in force.
pub fn write_rejected(out: &mut impl Write, rejected: &pb::ModelRejected) -> io::Result<()> {
    for error in &rejected.errors {
        if error.line == 0 {
            writeln!(out, "{}: {}", error.file, error.message)?;
        } else {
            writeln!(out, "{}:{}:{}: {}", error.file, error.line, error.column, error.message)?;
        }
        if !error.hint.is_empty() {
            writeln!(out, "  hint: {}", error.hint)?;
        }
    }
    let in_force = rejected.model_in_force.clone().unwrap_or_default();
    writeln!(
        out,
        "rejected: {} error(s); the model in force stays ({}, {} component(s), {} flow(s))",
        rejected.errors.len(),
        in_force.path,
        in_force.components,
        in_force.flows
    )
}
