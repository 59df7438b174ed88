//! What one node process is told to do: the federation's spec, its own `DflNode` spec, its
//! identity and who the other members are. The local launcher writes one of these per node;
//! on a cluster the operator puts it in the node's ConfigMap.

use std::path::{Path, PathBuf};

use edgesync_api::{DatasetFormat, DflNodeSpec, FederationRoundSpec, ModelKind};
use serde::{Deserialize, Serialize};

use crate::data::{DatasetKind, DatasetSpec};
use crate::model::{Architecture, ModelSpec};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    pub federation: String,
    pub name: String,
    pub federation_spec: FederationRoundSpec,
    pub node_spec: DflNodeSpec,
    /// File holding this node's Ed25519 keypair (libp2p protobuf encoding).
    pub key_file: PathBuf,
    /// Multiaddress to listen on, e.g. `/ip4/0.0.0.0/tcp/7400`.
    pub listen: String,
    /// Every member of the federation, this node included.
    pub members: Vec<MemberConfig>,
    /// Checkpoints go here.
    pub state_dir: PathBuf,
    /// CPU threads for libtorch; absent keeps libtorch's default.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Address serving `/metrics`, `/healthz` and `/readyz`, e.g. `0.0.0.0:9400`; absent
    /// serves none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberConfig {
    pub name: String,
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub model: MemberModel,
    /// Nodes with equal keys read the same dataset and split it among themselves.
    pub dataset_key: String,
    /// Whether this member is a topology neighbour of the node reading the config.
    pub neighbour: bool,
}

/// Enough about a member's model to know which parameters it shares with ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberModel {
    pub kind: ModelKind,
    pub in_channels: i64,
    pub classes: i64,
}

impl MemberModel {
    /// The model a `DflNode` trains, with channels decided by [`input_channels`].
    pub fn of(spec: &DflNodeSpec, classes: i64) -> MemberModel {
        MemberModel {
            kind: spec.model,
            in_channels: input_channels(spec),
            classes,
        }
    }

    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            architecture: architecture(self.kind),
            in_channels: self.in_channels,
            classes: self.classes,
        }
    }
}

/// Colour channels a node's model takes: one for grayscale and digit data, three
/// otherwise. The node converts its images to match, so every member can tell every other
/// member's parameter shapes from the manifest alone.
pub fn input_channels(spec: &DflNodeSpec) -> i64 {
    let gray_format = matches!(
        spec.dataset.format,
        DatasetFormat::Mnist | DatasetFormat::FashionMnist
    );
    if spec.dataset.grayscale || gray_format {
        1
    } else {
        3
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

/// Nodes reading the same folder split it; the key is the folder and its format.
pub fn dataset_key(spec: &DflNodeSpec) -> String {
    format!("{:?}:{}", spec.dataset.format, spec.dataset.path)
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let de = serde_yaml::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Field {
            path: path.to_path_buf(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    pub fn me(&self) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.name == self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read node configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node configuration {path}: field {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}
