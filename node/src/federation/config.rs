//! What one node process is told to do. The format lives in the shared API crate, since
//! the operator writes it too; this module adds what only the node can derive from it:
//! the libtorch model and the dataset reader.

use std::path::PathBuf;

use edgesync_api::{DatasetFormat, DflNodeSpec, ModelKind};

pub use edgesync_api::node_config::{
    dataset_key, input_channels, ConfigError, MemberConfig, MemberModel, NodeConfig,
};

use crate::data::{DatasetKind, DatasetSpec};
use crate::model::{Architecture, ModelSpec};

/// The network a member trains, as the node builds it.
pub fn model_spec(model: &MemberModel) -> ModelSpec {
    ModelSpec {
        architecture: architecture(model.kind),
        in_channels: model.in_channels,
        classes: model.classes,
    }
}

pub fn architecture(kind: ModelKind) -> Architecture {
    match kind {
        ModelKind::JetsonCnn => Architecture::JetsonCnn,
        ModelKind::AkidaCnn => Architecture::AkidaCnn,
    }
}

pub fn dataset_spec(spec: &DflNodeSpec) -> DatasetSpec {
    DatasetSpec {
        kind: match spec.dataset.format {
            DatasetFormat::Auto => DatasetKind::Auto,
            DatasetFormat::Cifar10Bin => DatasetKind::Cifar10Bin,
            DatasetFormat::Mnist => DatasetKind::Mnist,
            DatasetFormat::FashionMnist => DatasetKind::FashionMnist,
            DatasetFormat::ImageFolder => DatasetKind::ImageFolder,
        },
        path: PathBuf::from(&spec.dataset.path),
        grayscale: spec.dataset.grayscale,
        resize: spec.dataset.resize,
    }
}
