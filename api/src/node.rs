//! `DflNode`: one edge device taking part in federations.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One edge device: what hardware it is, which model it trains and where its data lives.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "edgesync.dev",
    version = "v1alpha1",
    kind = "DflNode",
    namespaced,
    status = "DflNodeStatus",
    shortname = "dfln",
    printcolumn = r#"{"name":"Hardware","type":"string","jsonPath":".spec.hardware"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Round","type":"integer","jsonPath":".status.round"}"#,
    printcolumn = r#"{"name":"Accuracy","type":"number","jsonPath":".status.accuracy"}"#,
    printcolumn = r#"{"name":"Peers","type":"integer","jsonPath":".status.connectedPeers"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DflNodeSpec {
    /// Class of device; decides which device plugin resource the pod requests.
    pub hardware: Hardware,
    /// Network the node trains.
    pub model: ModelKind,
    /// The node's local data.
    pub dataset: DatasetRef,
    /// Where the node must run.
    #[serde(default)]
    pub placement: Placement,
    /// CPU and memory for the node's pod, as Kubernetes quantities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<NodeResources>,
    /// For robustness experiments only: the node trains normally but publishes corrupted
    /// models, as a faulty or hostile member would. Never set on a real device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misbehaviour: Option<Misbehaviour>,
}

/// How a misbehaving node corrupts the model it publishes to its neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Misbehaviour {
    pub kind: MisbehaviourKind,
    /// Strength of the corruption; see each kind.
    #[serde(default = "default_misbehaviour_scale")]
    #[schemars(range(min = 0.0))]
    pub scale: f64,
}

fn default_misbehaviour_scale() -> f64 {
    10.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MisbehaviourKind {
    /// Publishes its change since the last round multiplied by `scale`.
    Scaled,
    /// Publishes its change multiplied by `-scale`.
    SignFlip,
    /// Publishes Gaussian noise `scale` times the size of its change.
    Random,
}

/// Kinds of edge hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Hardware {
    /// NVIDIA Jetson board: CUDA through the NVIDIA device plugin.
    Jetson,
    /// BrainChip Akida board: AKD1000 on PCIe through its device plugin.
    Akida,
    /// Plain CPU host.
    Cpu,
}

/// Networks a node can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Three conv blocks of 32, 64, 128 channels and a 256-unit classifier.
    JetsonCnn,
    /// Half-width CNN with bounded activations, quantisable for Akida.
    AkidaCnn,
}

/// Layouts of dataset folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetFormat {
    /// Detect from the files present.
    Auto,
    /// CIFAR-10 binary release.
    Cifar10Bin,
    /// MNIST, IDX files.
    Mnist,
    /// Fashion-MNIST, IDX files.
    FashionMnist,
    /// `<root>/<split>/<class>/*.jpg|png`.
    ImageFolder,
}

/// The node's local data and how the model should see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetRef {
    pub format: DatasetFormat,
    /// Folder holding the data: a host path on a cluster; locally, relative paths are
    /// taken from the manifest's folder.
    pub path: String,
    /// Convert colour images to grayscale.
    #[serde(default)]
    pub grayscale: bool,
    /// Resize images to this many pixels per side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 1024))]
    pub resize: Option<u32>,
}

/// Where a node's pod may be scheduled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Kubernetes node that hosts the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Labels a hosting Kubernetes node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// Requests and limits of the node's pod.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// What the node last reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DflNodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<NodePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_peers: Option<u32>,
    /// Why the node stopped, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Life cycle of a node in a federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NodePhase {
    Pending,
    Training,
    Succeeded,
    Failed,
}
