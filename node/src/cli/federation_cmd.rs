//! `dfl-node run` (one federation node, what a pod runs) and `dfl-node local` (a whole
//! federation as local processes).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use edgesync_api::NodePhase;

use crate::faults::FaultPlan;
use crate::federation::config::NodeConfig;
use crate::federation::launcher;
use crate::federation::runner::{self, Outcome};
use crate::status::{Pacing, StatusReporter};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Node configuration written by the launcher or the operator.
    #[arg(long, env = "EDGESYNC_CONFIG")]
    pub config: PathBuf,

    /// Namespace of this node's DflNode. When set, the node reports its phase, round,
    /// loss, accuracy and peers into the DflNode's status through the Kubernetes API, with
    /// the pod's service account (or the kubeconfig outside a cluster).
    #[arg(long, env = "EDGESYNC_NAMESPACE")]
    pub status_namespace: Option<String>,

    /// Faults to inject, for testing only: comma-separated `send-delay-ms=N` (hold every
    /// outgoing update N ms) and `checkpoint-stall-ms=N` (pause each checkpoint write
    /// halfway for N ms).
    #[arg(long, env = "EDGESYNC_INJECT_FAULTS", default_value = "")]
    pub inject_faults: FaultPlan,
}

#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Manifest holding one FederationRound and its DflNodes.
    #[arg(short = 'f', long = "file", env = "EDGESYNC_MANIFEST")]
    pub manifest: PathBuf,

    /// Folder for the report, node logs, identities and checkpoints
    /// [default: runs/<federation>].
    #[arg(long, env = "EDGESYNC_REPORT_DIR")]
    pub report_dir: Option<PathBuf>,

    /// Continue the run whose checkpoints are in the report folder.
    #[arg(long, env = "EDGESYNC_RESUME")]
    pub resume: bool,

    /// libtorch CPU threads per node process (0 keeps libtorch's default).
    #[arg(long, env = "EDGESYNC_THREADS_PER_NODE", default_value_t = 1)]
    pub threads_per_node: usize,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run_node(args: RunArgs) -> anyhow::Result<()> {
    let config = NodeConfig::load(&args.config)?;
    runtime()?.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        spawn_stop_on_signal(stop.clone())?;

        let reporter = match &args.status_namespace {
            Some(namespace) => {
                let reporter = StatusReporter::connect(namespace, &config.name, Pacing::default())
                    .await
                    .with_context(|| format!("reporting status into DflNode {}", config.name))?;
                Some(Arc::new(reporter))
            }
            None => None,
        };
        let hook = reporter.clone().map(|reporter| {
            Box::new(move |event: &_| reporter.observe(event)) as runner::EventHook
        });

        if !args.inject_faults.is_empty() {
            tracing::warn!(faults = ?args.inject_faults, "injecting faults into this node");
        }
        let result = runner::run(config, stop, hook, args.inject_faults).await;

        // The runner has dropped its hook, so this is the last reference. A node asked to
        // stop keeps its phase: its pod is being replaced or removed, not done.
        if let Some(reporter) = reporter.and_then(Arc::into_inner) {
            let end = match &result {
                Ok(Outcome::Completed) => Some((NodePhase::Succeeded, None)),
                Ok(Outcome::Stopped) => None,
                Err(error) => Some((NodePhase::Failed, Some(format!("{error:#}")))),
            };
            reporter.finish(end).await;
        }
        result.map(|_| ())
    })
}

pub fn run_local(args: LocalArgs) -> anyhow::Result<()> {
    let options = launcher::LocalOptions {
        manifest: args.manifest,
        report_dir: args.report_dir,
        resume: args.resume,
        threads_per_node: (args.threads_per_node > 0).then_some(args.threads_per_node),
    };
    runtime()?.block_on(launcher::run(options))?;
    Ok(())
}

/// SIGTERM (what Kubernetes and the launcher send) or SIGINT set `stop`; the node then
/// finishes its current round, checkpoints and exits.
fn spawn_stop_on_signal(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested: finishing the current round");
        stop.store(true, Ordering::Relaxed);
    });
    Ok(())
}
