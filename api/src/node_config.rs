//! The configuration one node process reads (`dfl-node run --config`): the federation's
//! spec, the node's own `DflNode` spec, its identity and who the other members are. The
//! local launcher writes one per node; on a cluster the operator puts it in the node's
//! ConfigMap. Both writers and the node share these types, so the format cannot drift.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DatasetFormat, DflNodeSpec, FederationRoundSpec, ModelKind};

/// One node's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// serves none (as in configurations written by earlier operators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<SocketAddr>,
}

/// What a node knows about one member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberConfig {
    pub name: String,
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub model: MemberModel,
    /// Members with equal keys read the same dataset and split it among themselves.
    pub dataset_key: String,
    /// Whether this member is a topology neighbour of the node reading the configuration.
    pub neighbour: bool,
}

/// Enough about a member's model to know which parameters it shares with ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberModel {
    pub kind: ModelKind,
    pub in_channels: i64,
    pub classes: i64,
    /// Side its images are resized to, where the manifest fixes one (digit formats are
    /// 28x28): a wider neighbour trains the slice this member holds on images of that side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_side: Option<i64>,
}

impl MemberModel {
    /// The model a `DflNode` trains on data with `classes` classes.
    pub fn of(spec: &DflNodeSpec, classes: i64) -> MemberModel {
        MemberModel {
            kind: spec.model,
            in_channels: input_channels(spec),
            classes,
            input_side: input_side(spec),
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

/// Side of the square images a node's model takes, where the manifest fixes it.
pub fn input_side(spec: &DflNodeSpec) -> Option<i64> {
    let digits = matches!(
        spec.dataset.format,
        DatasetFormat::Mnist | DatasetFormat::FashionMnist
    );
    match spec.dataset.resize {
        Some(side) => Some(i64::from(side)),
        None if digits => Some(28),
        None => None,
    }
}

/// Nodes reading the same folder in the same format split it; the key names both.
pub fn dataset_key(spec: &DflNodeSpec) -> String {
    format!("{:?}:{}", spec.dataset.format, spec.dataset.path)
}

impl NodeConfig {
    /// Reads a configuration file, naming the field that does not parse.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        NodeConfig::parse(&text).map_err(|e| match e {
            ConfigError::Field { field, message, .. } => ConfigError::Field {
                path: path.to_path_buf(),
                field,
                message,
            },
            other => other,
        })
    }

    /// Parses configuration text; errors name the field.
    pub fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Field {
            path: PathBuf::new(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// The configuration text the node reads.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    /// This node's own entry in the member list.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DatasetRef, Hardware, Placement};

    fn spec(format: DatasetFormat, grayscale: bool) -> DflNodeSpec {
        DflNodeSpec {
            hardware: Hardware::Jetson,
            model: ModelKind::JetsonCnn,
            dataset: DatasetRef {
                format,
                path: "/data/x".into(),
                grayscale,
                resize: None,
            },
            placement: Placement::default(),
            resources: None,
            misbehaviour: None,
        }
    }

    #[test]
    fn channels_and_dataset_keys_follow_the_data() {
        assert_eq!(input_channels(&spec(DatasetFormat::Mnist, false)), 1);
        assert_eq!(input_channels(&spec(DatasetFormat::Cifar10Bin, false)), 3);
        assert_eq!(input_channels(&spec(DatasetFormat::ImageFolder, true)), 1);
        assert_eq!(
            dataset_key(&spec(DatasetFormat::Cifar10Bin, false)),
            "Cifar10Bin:/data/x"
        );
    }

    #[test]
    fn the_input_side_is_known_where_the_manifest_fixes_it() {
        assert_eq!(input_side(&spec(DatasetFormat::Mnist, false)), Some(28));
        assert_eq!(input_side(&spec(DatasetFormat::ImageFolder, true)), None);
        let mut resized = spec(DatasetFormat::ImageFolder, true);
        resized.dataset.resize = Some(24);
        assert_eq!(input_side(&resized), Some(24));
        assert_eq!(MemberModel::of(&resized, 10).input_side, Some(24));
    }

    #[test]
    fn a_bad_field_is_named() {
        let err = NodeConfig::parse("federation: f\nname: [1]\n").unwrap_err();
        assert!(err.to_string().contains("field name"), "{err}");
    }
}
