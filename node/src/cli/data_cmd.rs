//! `dfl-node data …`: download datasets, inspect them and their partitions.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{DataArgs, PartitionArgs};
use crate::data::fetch::{self, FetchDataset, Fetcher};
use crate::data::{self, partition, Split};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print a dataset's sizes, label histogram and per-node partition histogram.
    Inspect(InspectArgs),
    /// Download a public dataset from its official source, verify it and unpack it.
    Fetch(FetchArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub data: DataArgs,

    #[command(flatten)]
    pub partition: PartitionArgs,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Dataset to download.
    #[arg(long, env = "EDGESYNC_FETCH_DATASET", value_enum)]
    pub dataset: FetchDataset,

    /// Folder to put the dataset's files in; created if missing.
    #[arg(long, env = "EDGESYNC_FETCH_DIR")]
    pub dir: PathBuf,

    /// Folder URL of a mirror holding the same file names, used instead of the official one.
    #[arg(long, env = "EDGESYNC_FETCH_BASE_URL")]
    pub base_url: Option<String>,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Inspect(args) => inspect(args),
        DataCommand::Fetch(args) => fetch(args),
    }
}

fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let (name, dir) = (args.dataset.as_str(), &args.dir);
    let files = args.dataset.remote_files(args.base_url.as_deref());
    fetch::fetch(&Fetcher::default(), args.dataset, &files, dir)
        .with_context(|| format!("fetching {name} into {}", dir.display()))?;
    // Auto-detection cannot tell MNIST from Fashion-MNIST by their files, so name the kind.
    let kind = match args.dataset {
        FetchDataset::Cifar10 => "cifar10-bin",
        FetchDataset::Mnist => "mnist",
        FetchDataset::FashionMnist => "fashion-mnist",
    };
    println!(
        "{name} ready: use --data {} --data-kind {kind}",
        dir.display()
    );
    Ok(())
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let spec = args.data.spec();
    let kind = match spec.kind {
        data::DatasetKind::Auto => data::detect(&spec.path)?,
        kind => kind,
    };
    println!("dataset {} ({kind:?})", spec.path.display());
    let train = data::load(&spec, Split::Train)
        .with_context(|| format!("loading training data from {}", spec.path.display()))?;
    for (name, set) in [("train", Some(&train)), ("test", None)] {
        let loaded;
        let set = match set {
            Some(s) => s,
            None => {
                loaded = data::load(&spec, Split::Test)
                    .with_context(|| format!("loading test data from {}", spec.path.display()))?;
                &loaded
            }
        };
        let (c, h, w) = set.image_shape();
        println!("{name}: {} images, {c}x{h}x{w}", set.len());
        print_row("  classes", &set.classes);
        print_row(
            "  samples",
            &set.histogram()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
        );
    }

    let labels = train.labels_vec();
    let p = args.partition.partition();
    let shares = partition::split(&labels, args.partition.nodes, p, args.partition.seed)
        .context("partitioning the training data")?;
    println!(
        "partition over {} nodes ({p:?}, seed {}):",
        args.partition.nodes, args.partition.seed
    );
    let hist = partition::histograms(&labels, &shares, train.classes.len());
    for (node, row) in hist.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|n| n.to_string()).collect();
        print_row(
            &format!("  node {node} ({:>5})", shares[node].len()),
            &cells,
        );
    }
    Ok(())
}

fn print_row(label: &str, cells: &[String]) {
    let cells: Vec<String> = cells.iter().map(|c| format!("{c:>10}")).collect();
    println!("{label:<16}{}", cells.join(""));
}
