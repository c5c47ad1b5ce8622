//! `driftwatch model ...`: work with model files without an agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use driftwatch_model::graph::GraphSnapshot;
use driftwatch_model::import::{import, ImportFormat};
use driftwatch_model::learn::learn;
use driftwatch_model::Model;
use driftwatch_proto::v1 as pb;

use crate::api::convert::graph_from_proto;
use crate::api::{connect, ListenAddr};

/// Subcommands of `driftwatch model`.
#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// Check a model file and print every error with its file, line and column.
    Validate(ValidateArgs),
    /// Compare two recorded graphs (`driftwatch check --record`) or two models: added and removed
    /// flows, listeners and executables.
    Diff(super::diff::DiffArgs),
    /// Convert a Threagile or Open Threat Model file into a driftwatch model.
    Import(ImportArgs),
    /// Write a model, or a patch to one, that declares a recorded graph.
    Learn(LearnArgs),
    /// Ask a running agent to read its model file again and put it in force if it is valid.
    Reload(super::reload::ReloadArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SourceFormat {
    Threagile,
    Otm,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Format of the input file.
    #[arg(long)]
    pub format: SourceFormat,
    /// The Threagile YAML or OTM (JSON or YAML) file.
    pub file: PathBuf,
    /// YAML keyed by the input's ids that adds selectors, listens, ports and zone CIDRs.
    #[arg(long)]
    pub overlay: Option<PathBuf>,
    /// Output file for the model; standard output when left out.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from_graph", "api"])))]
pub struct LearnArgs {
    /// A graph as `driftwatch graph --format json` prints it.
    #[arg(long)]
    pub from_graph: Option<PathBuf>,
    /// Learn from a running agent's graph at this API address (unix:/path/to.sock, 127.0.0.1:PORT
    /// or [::1]:PORT), read once `--duration` has passed.
    #[arg(long, value_name = "ADDR")]
    pub api: Option<ListenAddr>,
    /// How long to let the agent observe before its graph is read, such as `10m` or `1h`. The
    /// graph holds everything the agent observed since it started, within its edge bound.
    #[arg(long, requires = "api", default_value = "0s")]
    pub duration: humantime::Duration,
    /// An existing model: only what it does not declare is written, as entries to append.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Output file for the model or patch; standard output when left out.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// The model file (YAML).
    pub file: PathBuf,
}

pub fn run(command: ModelCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Validate(args) => validate(&args),
        ModelCommand::Diff(args) => super::diff::run(args),
        ModelCommand::Import(args) => import_model(&args),
        ModelCommand::Learn(args) => learn_model(&args),
        ModelCommand::Reload(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("failed to start the async runtime")?;
            runtime.block_on(super::reload::run(args))
        }
    }
}

fn write_output(output: Option<&PathBuf>, text: &str) -> anyhow::Result<()> {
    match output {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("failed to write {}", path.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn import_model(args: &ImportArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("failed to read {}", args.file.display()))?;
    let overlay = match &args.overlay {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("failed to read the overlay {}", path.display()))?,
        ),
        None => None,
    };
    let format = match args.format {
        SourceFormat::Threagile => ImportFormat::Threagile,
        SourceFormat::Otm => ImportFormat::Otm,
    };
    let name = args.file.display().to_string();
    let imported = match import(format, &text, &name, overlay.as_deref()) {
        Ok(imported) => imported,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::from(2));
        }
    };
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    write_output(args.output.as_ref(), &imported.yaml)?;
    Ok(ExitCode::SUCCESS)
}

fn learn_model(args: &LearnArgs) -> anyhow::Result<ExitCode> {
    let snapshot = match (&args.from_graph, &args.api) {
        (Some(path), _) => read_graph(path)?,
        (None, Some(api)) => observe_graph(api, args.duration.into())?,
        (None, None) => anyhow::bail!("give --from-graph FILE or --api ADDR"),
    };
    let base = match &args.base {
        Some(path) => match Model::load(path) {
            Ok(model) => Some(model),
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "{}: invalid base model ({} errors)",
                    path.display(),
                    errors.len()
                );
                return Ok(ExitCode::from(2));
            }
        },
        None => None,
    };
    let learned = learn(&snapshot, base.as_ref());
    eprintln!(
        "learned {} zones, {} components and {} flows",
        learned.zones, learned.components, learned.flows
    );
    write_output(args.output.as_ref(), &learned.yaml)?;
    Ok(ExitCode::SUCCESS)
}

fn read_graph(path: &Path) -> anyhow::Result<GraphSnapshot> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a graph as `driftwatch graph --format json` prints it",
            path.display()
        )
    })
}

/// Waits `duration` while the agent at `api` observes, then reads its graph.
fn observe_graph(api: &ListenAddr, duration: Duration) -> anyhow::Result<GraphSnapshot> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        // Connect first, so a wrong address fails now rather than after the wait.
        let mut client = connect(api).await?;
        if !duration.is_zero() {
            eprintln!(
                "observing through the agent at {api} for {}",
                humantime::format_duration(duration)
            );
            tokio::time::sleep(duration).await;
        }
        let graph = client
            .get_graph(pb::GetGraphRequest {})
            .await
            .with_context(|| format!("failed to read the graph of the agent at {api}"))?
            .into_inner();
        graph_from_proto(graph)
            .with_context(|| format!("the agent at {api} returned a graph this build cannot read"))
    })
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
            eprintln!(
                "{}: invalid model ({} errors)",
                args.file.display(),
                errors.len()
            );
            Ok(ExitCode::from(2))
        }
    }
}
