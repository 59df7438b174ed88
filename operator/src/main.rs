//! `edgesync-operator`: runs the EdgeSync controllers, or prints the CRDs they serve.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use edgesync_operator::telemetry::{self, LogFormat};
use edgesync_operator::{crd, render, NodePodSettings, RunArgs};

#[derive(Debug, Parser)]
#[command(
    name = "edgesync-operator",
    version,
    about = "EdgeSync Kubernetes operator"
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers (what the operator Deployment runs).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions of FederationRound and DflNode as YAML.
    Crd,
    /// Print the objects the operator would create for a manifest, without a cluster.
    Render(Box<RenderArgs>),
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// Manifest holding one FederationRound and its DflNodes.
    #[arg(short = 'f', long = "file", env = "EDGESYNC_OPERATOR_MANIFEST")]
    manifest: PathBuf,

    /// Namespace of the objects when the FederationRound names none.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_RENDER_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,

    #[command(flatten)]
    pods: NodePodSettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", crd::crds_yaml()?),
        Command::Render(args) => {
            args.pods.check()?;
            let text = std::fs::read_to_string(&args.manifest)
                .with_context(|| format!("reading {}", args.manifest.display()))?;
            let yaml = render::render(&text, &args.namespace, &args.pods)
                .with_context(|| format!("manifest {}", args.manifest.display()))?;
            print!("{yaml}");
        }
        Command::Run(args) => {
            telemetry::init(cli.log_format);
            edgesync_operator::run(*args).await?;
        }
    }
    Ok(())
}
