//! `dfl-node akida …`: export an Akida-class checkpoint for the AKD1000 and evaluate the
//! export with the bit-exact integer engine.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::DataArgs;
use crate::akida::export::{self, Export};
use crate::akida::{self as akida_mod, qat};
use crate::data::{self, Split};

#[derive(Debug, Subcommand)]
pub enum AkidaCommand {
    /// Write the edgesync-akida-v1 integer model of an akida-cnn checkpoint.
    Export(ExportArgs),
    /// Classify a dataset's test images with the integer engine and print its accuracy.
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Node checkpoint of an akida-cnn model (from `dfl-node train` or a federation node).
    #[arg(long, env = "EDGESYNC_AKIDA_CHECKPOINT")]
    pub checkpoint: PathBuf,

    /// Where to write the export (JSON).
    #[arg(long, env = "EDGESYNC_AKIDA_OUT")]
    pub out: PathBuf,

    /// Side of the input images in pixels; smaller images (28x28 digits) are zero-padded to
    /// it, as in training. A multiple of 8.
    #[arg(long, env = "EDGESYNC_AKIDA_INPUT_SIDE", default_value_t = 32)]
    pub input_side: i64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Export written by `dfl-node akida export`.
    #[arg(long, env = "EDGESYNC_AKIDA_MODEL")]
    pub model: PathBuf,

    #[command(flatten)]
    pub data: DataArgs,

    /// Evaluate on at most this many evenly spaced test images (0 means all).
    #[arg(long, env = "EDGESYNC_AKIDA_LIMIT", default_value_t = 0)]
    pub limit: usize,

    /// Also write the (padded) test images, uint8 NHWC, as a NumPy file for
    /// `scripts/akida/convert.py --check`.
    #[arg(long, env = "EDGESYNC_AKIDA_SAVE_IMAGES")]
    pub save_images: Option<PathBuf>,

    /// Also write the engine's raw int32 potentials, shaped as akida's forward() returns
    /// them, as a NumPy file for `scripts/akida/convert.py --expect`.
    #[arg(long, env = "EDGESYNC_AKIDA_SAVE_POTENTIALS")]
    pub save_potentials: Option<PathBuf>,
}

pub fn run(cmd: AkidaCommand) -> anyhow::Result<()> {
    match cmd {
        AkidaCommand::Export(args) => export_cmd(args),
        AkidaCommand::Eval(args) => eval_cmd(args),
    }
}

fn export_cmd(args: ExportArgs) -> anyhow::Result<()> {
    if args.input_side <= 0 || args.input_side % qat::SIDE_MULTIPLE != 0 {
        bail!(
            "--input-side {} must be a positive multiple of {}",
            args.input_side,
            qat::SIDE_MULTIPLE
        );
    }
    let (_vs, model) = akida_mod::model_from_checkpoint(&args.checkpoint)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let export = export::from_model(&model, args.input_side, args.input_side)
        .with_context(|| format!("exporting {}", args.checkpoint.display()))?;
    export.save(&args.out)?;
    let weights: usize = export.layers.iter().map(|l| l.weights.values.len()).sum();
    println!(
        "wrote {} ({} layers, {weights} integer weights, {}x{}x{} input, {} classes)",
        args.out.display(),
        export.layers.len(),
        export.input.height,
        export.input.width,
        export.input.channels,
        export.classes
    );
    Ok(())
}

fn eval_cmd(args: EvalArgs) -> anyhow::Result<()> {
    let export = Export::load(&args.model)?;
    let spec = args.data.spec();
    let mut test = data::load(&spec, Split::Test)
        .with_context(|| format!("loading test data from {}", spec.path.display()))?;
    if args.limit > 0 && args.limit < test.len() {
        test = test.evenly_spaced(args.limit);
    }
    let started = std::time::Instant::now();
    let result = akida_mod::evaluate_export(&export, &test).with_context(|| {
        format!(
            "running {} on {}",
            args.model.display(),
            spec.path.display()
        )
    })?;
    println!(
        "integer engine: accuracy {:.2}% on {} test images ({:.1} s)",
        result.accuracy * 100.0,
        result.samples,
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.save_images {
        let images = akida_mod::images_nhwc(&test, export.input)?;
        akida_mod::save_images_npy(path, &images, export.input)?;
    }
    if let Some(path) = &args.save_potentials {
        akida_mod::save_potentials_npy(path, &result.outputs.potentials, export.classes)?;
    }
    Ok(())
}
