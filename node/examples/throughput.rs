//! Training throughput of the Jetson-class CNN on the CPU, through the node's own `Trainer`.
//!
//! The data are random bytes held in memory, so that the figure measures batching, the
//! forward and backward passes and the optimiser, not disk reads or decoding. It prints one
//! line of `key=value` fields for bench/throughput.sh to compare with PyTorch:
//!
//! ```text
//! rust images_per_second=1234.5 threads=2 batch=128 steps=60 warmup=10 augment=off ...
//! ```
//!
//! Run: `cargo run --release -p edgesync-node --example throughput -- --threads 2`

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use edgesync_node::data::Dataset;
use edgesync_node::model::{Architecture, ModelSpec};
use edgesync_node::optim::{OptimizerConfig, OptimizerKind};
use edgesync_node::train::{TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

/// Images in the synthetic dataset: enough for several distinct batches per epoch, so the
/// batcher's shuffling and gathering cost what they cost in real training.
const DATASET_LEN: i64 = 2048;
const CLASSES: i64 = 10;

#[derive(Debug, Parser)]
#[command(about = "Measure the node's CPU training throughput for the Jetson-class CNN")]
struct Args {
    /// Intra-op CPU threads for libtorch; 0 means one per available core.
    #[arg(long, env = "THROUGHPUT_THREADS", default_value_t = 0)]
    threads: usize,
    /// Timed optimiser steps.
    #[arg(long, env = "THROUGHPUT_STEPS", default_value_t = 60)]
    steps: u64,
    /// Untimed steps first, so that allocator caches and oneDNN kernels are warm.
    #[arg(long, env = "THROUGHPUT_WARMUP", default_value_t = 10)]
    warmup: u64,
    #[arg(long, env = "THROUGHPUT_BATCH_SIZE", default_value_t = 128)]
    batch_size: usize,
    /// Random crops and flips on each batch (on/off).
    #[arg(long, env = "THROUGHPUT_AUGMENT", default_value = "off", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), hide_possible_values = true)]
    augment: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    tch::set_num_threads(threads as i32);

    tch::manual_seed(args.seed as i64);
    let data = synthetic_cifar();

    let spec = ModelSpec {
        architecture: Architecture::JetsonCnn,
        in_channels: 3,
        classes: CLASSES,
    };
    let config = TrainConfig {
        batch_size: args.batch_size,
        local_steps: args.warmup + args.steps,
        rounds: 1,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Adam,
            learning_rate: 1e-3,
            weight_decay: 5e-4,
            momentum: 0.9,
            clip_grad_norm: Some(5.0),
        },
        warmup_steps: 0,
        augment: args.augment,
        seed: args.seed,
    };
    // The CPU explicitly, even where libtorch could see a GPU: this compares CPU training.
    let mut trainer = Trainer::new(spec, config, data.len(), Device::Cpu);

    if args.warmup > 0 {
        trainer.train_steps(&data, args.warmup)?;
    }
    let stats = trainer.train_steps(&data, args.steps)?;
    let images_per_second = stats.samples as f64 / stats.seconds;
    println!(
        "rust images_per_second={images_per_second:.1} threads={threads} batch={} steps={} \
         warmup={} augment={} seconds={:.3} mean_loss={:.4} libtorch_threads={}",
        args.batch_size,
        args.steps,
        args.warmup,
        if args.augment { "on" } else { "off" },
        stats.seconds,
        stats.mean_loss,
        tch::get_num_threads(),
    );
    Ok(())
}

/// CIFAR-10-shaped random images and labels, in the `Dataset` form the loaders return.
fn synthetic_cifar() -> Dataset {
    let options = (Kind::Int64, Device::Cpu);
    let images = Tensor::randint(256, [DATASET_LEN, 3, 32, 32], options).to_kind(Kind::Uint8);
    let labels = Tensor::randint(CLASSES, [DATASET_LEN], options);
    Dataset {
        images,
        labels,
        classes: (0..CLASSES).map(|c| format!("class{c}")).collect(),
    }
}
