//! `dfl-node train`: one node training alone on its share of the data.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{DataArgs, PartitionArgs};
use crate::data::{self, partition, Split};
use crate::model::{Architecture, ModelSpec};
use crate::optim::{OptimizerConfig, OptimizerKind};
use crate::train::{TrainConfig, Trainer};

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,

    #[command(flatten)]
    pub partition: PartitionArgs,

    /// Network to train.
    #[arg(long, env = "EDGESYNC_MODEL", value_enum, default_value = "jetson-cnn")]
    pub model: Architecture,

    /// Rounds of local training; each ends with a report line.
    #[arg(long, env = "EDGESYNC_ROUNDS", default_value_t = 20)]
    pub rounds: u64,

    /// Optimiser steps (mini-batches) per round.
    #[arg(long, env = "EDGESYNC_LOCAL_STEPS", default_value_t = 100)]
    pub local_steps: u64,

    /// Mini-batch size.
    #[arg(long, env = "EDGESYNC_BATCH_SIZE", default_value_t = 128)]
    pub batch_size: usize,

    /// Optimiser.
    #[arg(long, env = "EDGESYNC_OPTIMIZER", value_enum, default_value = "adam")]
    pub optimizer: OptimizerKind,

    /// Peak learning rate of the cosine schedule.
    #[arg(long, env = "EDGESYNC_LR", default_value_t = 2e-3)]
    pub lr: f64,

    /// Weight decay (decoupled for Adam, L2 for SGD).
    #[arg(long, env = "EDGESYNC_WEIGHT_DECAY", default_value_t = 5e-4)]
    pub weight_decay: f64,

    /// SGD momentum, or Adam's first-moment decay.
    #[arg(long, env = "EDGESYNC_MOMENTUM", default_value_t = 0.9)]
    pub momentum: f64,

    /// Clip gradients to this global L2 norm (0 turns clipping off).
    #[arg(long, env = "EDGESYNC_CLIP_GRAD_NORM", default_value_t = 5.0)]
    pub clip_grad_norm: f64,

    /// Learning-rate warm-up, in steps.
    #[arg(long, env = "EDGESYNC_WARMUP_STEPS", default_value_t = 200)]
    pub warmup_steps: u64,

    /// Random crops and flips while training [default: on for colour images].
    #[arg(long, env = "EDGESYNC_AUGMENT")]
    pub augment: Option<bool>,

    /// Evaluate on the test split every this many rounds (and after the last).
    #[arg(long, env = "EDGESYNC_EVAL_EVERY", default_value_t = 1)]
    pub eval_every: u64,

    /// Evaluate on at most this many test images (0 means all).
    #[arg(long, env = "EDGESYNC_EVAL_LIMIT", default_value_t = 0)]
    pub eval_limit: usize,

    /// Write a checkpoint here after every round, and resume from it if present.
    #[arg(long, env = "EDGESYNC_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,

    /// Write a JSON summary (per-round figures, final confusion matrix) to this file.
    #[arg(long, env = "EDGESYNC_REPORT")]
    pub report: Option<PathBuf>,

    /// CPU threads for libtorch (0 keeps libtorch's default).
    #[arg(long, env = "EDGESYNC_THREADS", default_value_t = 0)]
    pub threads: usize,
}

#[derive(Debug, serde::Serialize)]
struct RoundLine {
    round: u64,
    train_loss: f64,
    test_accuracy: Option<f64>,
    test_loss: Option<f64>,
    images_per_second: f64,
    elapsed_seconds: f64,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if args.partition.node_index >= args.partition.nodes {
        bail!(
            "--node-index {} is out of range for --nodes {}",
            args.partition.node_index,
            args.partition.nodes
        );
    }
    if args.rounds == 0 || args.local_steps == 0 || args.batch_size == 0 {
        bail!("--rounds, --local-steps and --batch-size must be positive");
    }
    let device = crate::device::select(Some(args.threads));
    let spec = args.data.spec();

    let started = std::time::Instant::now();
    let full_train = data::load(&spec, Split::Train)
        .with_context(|| format!("loading training data from {}", spec.path.display()))?;
    let mut test = data::load(&spec, Split::Test)
        .with_context(|| format!("loading test data from {}", spec.path.display()))?;
    if args.eval_limit > 0 && args.eval_limit < test.len() {
        test = test.evenly_spaced(args.eval_limit);
    }
    let shares = partition::split(
        &full_train.labels_vec(),
        args.partition.nodes,
        args.partition.partition(),
        args.partition.seed,
    )
    .context("partitioning the training data")?;
    let train = full_train.subset(&shares[args.partition.node_index]);
    drop(full_train);
    let (channels, height, width) = train.image_shape();
    tracing::info!(
        train = train.len(),
        test = test.len(),
        channels,
        height,
        width,
        seconds = started.elapsed().as_secs_f64(),
        "data loaded"
    );

    let model_spec = ModelSpec {
        architecture: args.model,
        in_channels: channels,
        classes: train.classes.len() as i64,
    };
    let config = TrainConfig {
        batch_size: args.batch_size,
        local_steps: args.local_steps,
        rounds: args.rounds,
        optimizer: OptimizerConfig {
            kind: args.optimizer,
            learning_rate: args.lr,
            weight_decay: args.weight_decay,
            momentum: args.momentum,
            clip_grad_norm: (args.clip_grad_norm > 0.0).then_some(args.clip_grad_norm),
        },
        warmup_steps: args.warmup_steps,
        augment: args.augment.unwrap_or(channels == 3),
        seed: args.partition.seed,
    };
    let mut trainer = Trainer::new(model_spec, config, train.len(), device);

    let mut first_round = 1;
    if let Some(path) = args.checkpoint.as_ref().filter(|p| p.exists()) {
        let ck = trainer.load_checkpoint(path)?;
        first_round = ck.field::<u64>("round")? + 1;
        tracing::info!(path = %path.display(), round = first_round - 1, "resumed from checkpoint");
    }

    let bar = progress_bar(args.rounds, first_round - 1);
    let mut lines = Vec::new();
    let mut last_eval = None;
    for round in first_round..=args.rounds {
        let stats = trainer.train_steps(&train, args.local_steps)?;
        let evaluate = round % args.eval_every.max(1) == 0 || round == args.rounds;
        let eval = evaluate.then(|| trainer.evaluate(&test));
        let line = RoundLine {
            round,
            train_loss: stats.mean_loss,
            test_accuracy: eval.as_ref().map(|e| e.accuracy),
            test_loss: eval.as_ref().map(|e| e.loss),
            images_per_second: stats.samples as f64 / stats.seconds.max(1e-9),
            elapsed_seconds: started.elapsed().as_secs_f64(),
        };
        let accuracy = line
            .test_accuracy
            .map_or_else(|| "      -".to_string(), |a| format!("{:6.2}%", a * 100.0));
        let text = format!(
            "round {round:>4}/{}  loss {:.4}  test acc {accuracy}  lr {:.2e}  {:>6.0} img/s",
            args.rounds,
            line.train_loss,
            trainer.learning_rate(),
            line.images_per_second
        );
        if bar.is_hidden() {
            println!("{text}");
        } else {
            bar.println(text);
        }
        bar.inc(1);
        if let Some(path) = &args.checkpoint {
            let meta = BTreeMap::from([("round".to_string(), round.to_string())]);
            trainer
                .save_checkpoint(path, Vec::new(), meta, None)
                .with_context(|| format!("writing checkpoint {}", path.display()))?;
        }
        lines.push(line);
        if eval.is_some() {
            last_eval = eval;
        }
    }
    bar.finish_and_clear();

    if let Some(eval) = &last_eval {
        println!(
            "final test accuracy {:.2}% (loss {:.4}) on {} images after {:.0} s",
            eval.accuracy * 100.0,
            eval.loss,
            eval.samples,
            started.elapsed().as_secs_f64()
        );
        print_confusion(&test.classes, &eval.confusion);
    }
    if let Some(path) = &args.report {
        let report = serde_json::json!({
            "model": args.model.as_str(),
            "fingerprint": trainer.fingerprint(),
            "device": crate::device::describe(device),
            "train_samples": train.len(),
            "rounds": lines,
            "final": last_eval,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    Ok(())
}

fn progress_bar(rounds: u64, done: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(rounds).with_position(done);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} round {pos}/{len}  elapsed {elapsed}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn print_confusion(classes: &[String], confusion: &[Vec<u64>]) {
    println!("confusion matrix (rows: true class, columns: predicted)");
    let width = classes.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
    for (name, row) in classes.iter().zip(confusion) {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
        println!("  {name:>width$} {}", cells.join(""));
    }
}
