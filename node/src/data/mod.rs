//! Local image data: loaders for the formats edge users keep, transforms, batching and the
//! federation's partition of a dataset over its nodes.
//!
//! Every loader returns the same [`Dataset`]: images as a `u8` tensor of shape
//! `[N, C, H, W]` and labels as an `i64` tensor of shape `[N]`. Keeping raw bytes in memory
//! costs a quarter of float storage (CIFAR-10's 50,000 training images take 150 MB) and
//! conversion to float happens per batch.

mod batcher;
mod cifar_bin;
pub mod fetch;
mod folder;
mod idx;
pub mod partition;
pub(crate) mod transform;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use batcher::Batcher;
pub use transform::{Augment, Normalize};

/// Names of CIFAR-10's classes in the label order of the official release.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Names of Fashion-MNIST's classes in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
];

/// What went wrong reading a dataset; every variant names the file or folder at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: truncated: {detail}")]
    Truncated { path: PathBuf, detail: String },
    #[error("{path}: wrong magic number {found:#010x}, expected {expected:#010x}")]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: label {label} at record {index} is out of range (0..{classes})")]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: i64,
        classes: usize,
    },
    #[error("{path}: unreadable image: {reason}")]
    UnreadableImage { path: PathBuf, reason: String },
    #[error("{path}: class folder holds no images")]
    EmptyClass { path: PathBuf },
    #[error("{path}: no class folders found")]
    NoClasses { path: PathBuf },
    #[error("{path}: image is {found}, expected {expected} like the first image (set a resize)")]
    SizeMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: {detail}")]
    Inconsistent { path: PathBuf, detail: String },
    #[error(
        "cannot tell the dataset format of {path}: expected CIFAR-10 .bin files, \
             MNIST-style IDX files or <split>/<class>/ image folders"
    )]
    UnknownLayout { path: PathBuf },
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The on-disk layouts a node can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// Detect the layout from the files present.
    Auto,
    /// CIFAR-10 binary release: data_batch_1.bin … data_batch_5.bin, test_batch.bin.
    Cifar10Bin,
    /// MNIST in IDX layout (plain or .gz).
    Mnist,
    /// Fashion-MNIST in IDX layout (plain or .gz).
    FashionMnist,
    /// `<root>/<split>/<class>/*.jpg|png`, classes sorted by name.
    ImageFolder,
}

/// Which half of a dataset to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Where a node's data lives and how it should look to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    pub kind: DatasetKind,
    pub path: PathBuf,
    /// Convert colour images to one luminance channel.
    #[serde(default)]
    pub grayscale: bool,
    /// Resize images to this many pixels per side.
    #[serde(default)]
    pub resize: Option<u32>,
}

/// Images and labels held in memory.
#[derive(Debug)]
pub struct Dataset {
    /// `u8`, `[N, C, H, W]`.
    pub images: Tensor,
    /// `i64`, `[N]`, each in `0..classes.len()`.
    pub labels: Tensor,
    pub classes: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(channels, height, width)` of every image.
    pub fn image_shape(&self) -> (i64, i64, i64) {
        let s = self.images.size();
        (s[1], s[2], s[3])
    }

    pub fn labels_vec(&self) -> Vec<i64> {
        Vec::<i64>::try_from(&self.labels).unwrap_or_default()
    }

    /// The images and labels at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = Tensor::from_slice(&idx);
        Dataset {
            images: self.images.index_select(0, &idx),
            labels: self.labels.index_select(0, &idx),
            classes: self.classes.clone(),
        }
    }

    /// `n` samples evenly spaced over the dataset, so that a limited evaluation still
    /// covers every class of a split stored class by class.
    pub fn evenly_spaced(&self, n: usize) -> Dataset {
        let step = self.len() as f64 / n.max(1) as f64;
        let picked: Vec<usize> = (0..n.min(self.len()))
            .map(|i| (i as f64 * step) as usize)
            .collect();
        self.subset(&picked)
    }

    /// The same images with `channels` colour channels: one-channel images are repeated
    /// to three, three-channel images are converted to luminance for one.
    pub fn with_channels(self, channels: i64) -> Result<Dataset, DataError> {
        let images = match (self.image_shape().0, channels) {
            (1, 3) => self.images.repeat([1, 3, 1, 1]),
            (3, 1) => transform::grayscale(&self.images)?,
            _ => return Ok(self),
        };
        Ok(Dataset { images, ..self })
    }

    /// Number of samples of each class.
    pub fn histogram(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for label in self.labels_vec() {
            counts[label as usize] += 1;
        }
        counts
    }
}

/// Loads one split of the dataset `spec` describes and applies its grayscale and resize
/// options. Never writes to the data folder.
pub fn load(spec: &DatasetSpec, split: Split) -> Result<Dataset, DataError> {
    let kind = match spec.kind {
        DatasetKind::Auto => detect(&spec.path)?,
        kind => kind,
    };
    let mut dataset = match kind {
        DatasetKind::Cifar10Bin => cifar_bin::load(&spec.path, split)?,
        DatasetKind::Mnist => idx::load(&spec.path, split, digit_classes())?,
        DatasetKind::FashionMnist => idx::load(&spec.path, split, names(&FASHION_MNIST_CLASSES))?,
        DatasetKind::ImageFolder => folder::load(&spec.path, split, spec.resize)?,
        DatasetKind::Auto => unreachable!("resolved above"),
    };
    if spec.grayscale {
        dataset.images = transform::grayscale(&dataset.images)?;
    }
    if let Some(side) = spec.resize {
        if dataset.image_shape().1 != side as i64 || dataset.image_shape().2 != side as i64 {
            dataset.images = transform::resize(&dataset.images, side as i64)?;
        }
    }
    Ok(dataset)
}

/// Tells the layout of a data folder from the files in it.
pub fn detect(path: &Path) -> Result<DatasetKind, DataError> {
    if path.join("data_batch_1.bin").is_file() || path.join("test_batch.bin").is_file() {
        return Ok(DatasetKind::Cifar10Bin);
    }
    if idx::find(path, "train-images-idx3-ubyte").is_some()
        || idx::find(path, "t10k-images-idx3-ubyte").is_some()
    {
        // Both MNIST and Fashion-MNIST use these names; a folder named like Fashion-MNIST is
        // read with its class names, anything else as digits.
        let name = path.to_string_lossy().to_lowercase();
        return Ok(if name.contains("fashion") {
            DatasetKind::FashionMnist
        } else {
            DatasetKind::Mnist
        });
    }
    if path.join("train").is_dir() || path.join("test").is_dir() {
        return Ok(DatasetKind::ImageFolder);
    }
    Err(DataError::UnknownLayout {
        path: path.to_path_buf(),
    })
}

fn digit_classes() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Builds a dataset from raw `[N, C, H, W]` bytes and labels, checking every label.
pub(crate) fn from_raw(
    path: &Path,
    pixels: Vec<u8>,
    shape: [i64; 4],
    labels: Vec<i64>,
    classes: Vec<String>,
) -> Result<Dataset, DataError> {
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as usize >= classes.len())
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label,
            classes: classes.len(),
        });
    }
    let images = Tensor::from_slice(&pixels).f_reshape(shape)?;
    Ok(Dataset {
        images,
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
        classes,
    })
}
