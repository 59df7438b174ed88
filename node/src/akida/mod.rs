//! Running the Akida-class model on a BrainChip AKD1000.
//!
//! The model trains quantisation-aware ([`qat`]), so that its float forward pass computes
//! what the chip computes. [`export`] turns it into integer weights, thresholds and
//! activation steps in the `edgesync-akida-v1` JSON format (described in
//! `docs/akida-export.md`); `scripts/akida/convert.py` builds an `akida.Model` from that file.
//! [`integer`] runs an export bit-exactly as the chip does, without the chip, and
//! [`evaluate`] measures a trainer's model that way.
//!
//! Quantisation-aware training is always on for the Akida architecture: the model exists
//! to run on the chip, the integer model is what it is judged by, and a second float-only
//! variant would give federations two Akida models whose averaged parameters mean different
//! things. Parameter names and shapes are those of a plain model, so checkpoints and the
//! exchange with other nodes are unchanged.

pub mod export;
pub mod integer;
pub mod qat;

use std::io::Write;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind};

use crate::checkpoint::{self, CheckpointError};
use crate::data::Dataset;
use crate::model::{self, Architecture, Cnn, ModelSpec};
use crate::train::Trainer;
use export::{Export, ExportError, InputShape};
use integer::{Engine, EngineError, Outputs};

#[derive(Debug, thiserror::Error)]
pub enum AkidaError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "images are {found} but the model takes {channels}-channel images of at most \
         {height}x{width} (smaller ones are zero-padded)"
    )]
    ImageShape {
        found: String,
        height: usize,
        width: usize,
        channels: usize,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint {path}: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
}

/// Loads the model of a node checkpoint written for an Akida-class model (by `dfl-node
/// train` or a federation node), on the CPU.
pub fn model_from_checkpoint(path: &Path) -> Result<(nn::VarStore, Cnn), AkidaError> {
    let ck = checkpoint::load(path)?;
    let bad = |reason: String| AkidaError::BadCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let architecture: String = ck.field("architecture")?;
    if architecture != Architecture::AkidaCnn.as_str() {
        return Err(bad(format!(
            "holds a {architecture} model; only {} models run on Akida",
            Architecture::AkidaCnn.as_str()
        )));
    }
    let dim = |name: &str, axis: usize| -> Result<i64, AkidaError> {
        let t = ck
            .tensors
            .get(name)
            .ok_or_else(|| bad(format!("lacks parameter {name}")))?;
        t.size()
            .get(axis)
            .copied()
            .ok_or_else(|| bad(format!("parameter {name} has shape {:?}", t.size())))
    };
    let spec = ModelSpec {
        architecture: Architecture::AkidaCnn,
        in_channels: dim("conv1.weight", 1)?,
        classes: dim("fc2.weight", 0)?,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let cnn = Cnn::new(&vs.root(), spec);
    tch::no_grad(|| -> Result<(), AkidaError> {
        for (name, mut var) in vs.variables() {
            let src = ck
                .tensors
                .get(&name)
                .ok_or_else(|| bad(format!("lacks parameter {name}")))?;
            if src.size() != var.size() {
                let reason = format!(
                    "parameter {name} has shape {:?}, expected {:?}",
                    src.size(),
                    var.size()
                );
                return Err(bad(reason));
            }
            var.f_copy_(&src.f_to_kind(Kind::Float)?)?;
        }
        Ok(())
    })?;
    if let Ok(found) = ck.field::<String>("fingerprint") {
        let expected = model::fingerprint(Architecture::AkidaCnn, &vs);
        if found != expected {
            return Err(bad(format!(
                "was written for model {found}, which is not this node's akida-cnn ({expected})"
            )));
        }
    }
    Ok((vs, cnn))
}

/// The integer engine's verdict on a dataset.
#[derive(Debug, Clone)]
pub struct IntegerEval {
    pub samples: usize,
    pub accuracy: f64,
    pub outputs: Outputs,
}

/// Exports the trainer's model in memory and returns the integer engine's accuracy on
/// `data`: the accuracy the model would have on the chip.
pub fn evaluate(trainer: &Trainer, data: &Dataset) -> Result<f64, AkidaError> {
    let (_, height, width) = data.image_shape();
    let export = export::from_model(
        &trainer.model,
        qat::padded_side(height),
        qat::padded_side(width),
    )?;
    Ok(evaluate_export(&export, data)?.accuracy)
}

/// Runs `export` on every image of `data` with the integer engine.
pub fn evaluate_export(export: &Export, data: &Dataset) -> Result<IntegerEval, AkidaError> {
    let engine = Engine::new(export)?;
    let images = images_nhwc(data, engine.input())?;
    let outputs = engine.run(&images)?;
    let labels = data.labels_vec();
    let correct = outputs
        .predictions
        .iter()
        .zip(&labels)
        .filter(|(&p, &l)| p as i64 == l)
        .count();
    let samples = labels.len();
    Ok(IntegerEval {
        samples,
        accuracy: if samples == 0 {
            0.0
        } else {
            correct as f64 / samples as f64
        },
        outputs,
    })
}

/// The dataset's images as the chip takes them: `uint8` NHWC of the model's input size,
/// smaller images centred in zeros exactly as the model pads them in training.
pub fn images_nhwc(data: &Dataset, input: InputShape) -> Result<Vec<u8>, AkidaError> {
    let (c, h, w) = data.image_shape();
    let (height, width) = (input.height as i64, input.width as i64);
    if c != input.channels as i64 || h > height || w > width {
        return Err(AkidaError::ImageShape {
            found: format!("{c}-channel {h}x{w}"),
            height: input.height,
            width: input.width,
            channels: input.channels,
        });
    }
    let (top, left) = (qat::pad_before(h, height), qat::pad_before(w, width));
    let padded = data.images.f_to_kind(Kind::Uint8)?.f_constant_pad_nd([
        left,
        width - w - left,
        top,
        height - h - top,
    ])?;
    let nhwc = padded
        .f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_view([-1])?;
    Ok(Vec::<u8>::try_from(&nhwc)?)
}

/// Writes a NumPy `.npy` file (format 1.0, little-endian, C order).
fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> Result<(), AkidaError> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6) + version (2) + length (2) + header, padded to 64 bytes with a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let write = |source| AkidaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(write)?);
    file.write_all(b"\x93NUMPY\x01\x00").map_err(write)?;
    file.write_all(&(header.len() as u16).to_le_bytes())
        .map_err(write)?;
    file.write_all(header.as_bytes()).map_err(write)?;
    file.write_all(data).map_err(write)?;
    file.flush().map_err(write)
}

/// Saves NHWC `uint8` images for `scripts/akida/convert.py --check`.
pub fn save_images_npy(path: &Path, images: &[u8], input: InputShape) -> Result<(), AkidaError> {
    let size = input.height * input.width * input.channels;
    let n = images.len() / size.max(1);
    let shape = [n, input.height, input.width, input.channels];
    write_npy(path, "|u1", &shape, images)
}

/// Saves `[N][classes]` potentials as akida's `forward` returns them, `int32 (N, 1, 1, C)`.
pub fn save_potentials_npy(
    path: &Path,
    potentials: &[i32],
    classes: usize,
) -> Result<(), AkidaError> {
    let bytes: Vec<u8> = potentials.iter().flat_map(|p| p.to_le_bytes()).collect();
    let shape = [potentials.len() / classes.max(1), 1, 1, classes];
    write_npy(path, "<i4", &shape, &bytes)
}
