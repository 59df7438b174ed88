//! The `dfl-node` command line.

mod akida_cmd;
mod data_cmd;
mod federation_cmd;
mod train_cmd;

use clap::{Args, Parser, Subcommand};

use crate::data::{DatasetKind, DatasetSpec};
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "dfl-node",
    version,
    about = "EdgeSync decentralized federated learning node"
)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(
        long,
        env = "EDGESYNC_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train one node alone on its share of a dataset and evaluate it.
    Train(train_cmd::TrainArgs),
    /// Download or inspect datasets.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Run one node of a federation (what a pod runs).
    Run(federation_cmd::RunArgs),
    /// Run a whole federation from a manifest as local processes on 127.0.0.1.
    Local(federation_cmd::LocalArgs),
    /// Export an Akida-class model for the AKD1000 and evaluate its integer model.
    #[command(subcommand)]
    Akida(akida_cmd::AkidaCommand),
}

/// Which data a node reads, shared by every command that loads images.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Folder holding the dataset.
    #[arg(long = "data", env = "EDGESYNC_DATA")]
    pub path: std::path::PathBuf,

    /// Layout of the dataset folder.
    #[arg(long, env = "EDGESYNC_DATA_KIND", value_enum, default_value = "auto")]
    pub data_kind: DatasetKind,

    /// Convert colour images to grayscale.
    #[arg(long, env = "EDGESYNC_GRAYSCALE")]
    pub grayscale: bool,

    /// Resize images to this many pixels per side.
    #[arg(long, env = "EDGESYNC_RESIZE")]
    pub resize: Option<u32>,
}

impl DataArgs {
    pub fn spec(&self) -> DatasetSpec {
        DatasetSpec {
            kind: self.data_kind,
            path: self.path.clone(),
            grayscale: self.grayscale,
            resize: self.resize,
        }
    }
}

/// How the federation's dataset is divided, and which share this node takes.
#[derive(Debug, Clone, Args)]
pub struct PartitionArgs {
    /// Number of nodes the training data is divided among.
    #[arg(long, env = "EDGESYNC_NODES", default_value_t = 1)]
    pub nodes: usize,

    /// This node's index among them, from 0.
    #[arg(long, env = "EDGESYNC_NODE_INDEX", default_value_t = 0)]
    pub node_index: usize,

    /// Dirichlet concentration of the label split; omit for an IID split.
    #[arg(long, env = "EDGESYNC_DIRICHLET_ALPHA")]
    pub alpha: Option<f64>,

    /// Fewest training samples any node may get under a Dirichlet split.
    #[arg(long, env = "EDGESYNC_MIN_PER_NODE", default_value_t = 10)]
    pub min_per_node: usize,

    /// Seed of the partition (and of training).
    #[arg(long, env = "EDGESYNC_SEED", default_value_t = 42)]
    pub seed: u64,
}

impl PartitionArgs {
    pub fn partition(&self) -> crate::data::partition::Partition {
        use crate::data::partition::Partition;
        match self.alpha {
            Some(alpha) => Partition::Dirichlet {
                alpha,
                min_per_node: self.min_per_node,
            },
            None => Partition::Iid,
        }
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => train_cmd::run(args),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Run(args) => federation_cmd::run_node(args),
        Command::Local(args) => federation_cmd::run_local(args),
        Command::Akida(cmd) => akida_cmd::run(cmd),
    }
}
