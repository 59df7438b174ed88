//! `FederationRound`: one decentralized training run over a set of `DflNode`s.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A training run: how long, how each node trains locally, how nodes exchange and
/// aggregate, and which `DflNode`s take part.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "edgesync.dev",
    version = "v1alpha1",
    kind = "FederationRound",
    namespaced,
    status = "FederationRoundStatus",
    shortname = "fedr",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Round","type":"integer","jsonPath":".status.currentRound"}"#,
    printcolumn = r#"{"name":"Rounds","type":"integer","jsonPath":".spec.rounds"}"#,
    printcolumn = r#"{"name":"Accuracy","type":"number","jsonPath":".status.meanAccuracy"}"#,
    printcolumn = r#"{"name":"Consensus","type":"number","jsonPath":".status.consensusDistance"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FederationRoundSpec {
    /// Communication rounds to run.
    #[schemars(range(min = 1))]
    pub rounds: u64,
    /// Optimiser steps (mini-batches) each node takes between exchanges.
    #[schemars(range(min = 1))]
    pub local_steps: u64,
    /// Mini-batch size.
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    /// Seeds the shared initial model, the data partition and training.
    #[serde(default)]
    pub seed: u64,
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub momentum: MomentumSpec,
    #[serde(default)]
    pub aggregation: AggregationSpec,
    pub topology: Topology,
    #[serde(default)]
    pub exchange: ExchangeSpec,
    pub partition: PartitionSpec,
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    /// Labels selecting the `DflNode`s of this federation.
    pub node_selector: LabelSelector,
}

/// Equality-based label selector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    /// Whether an object with `labels` is selected. An empty selector selects everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay.
    Adam,
    /// SGD with momentum.
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Cosine decay over all rounds.
    Cosine,
    /// Constant rate.
    Constant,
}

/// Each node's local optimiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizerSpec {
    pub kind: OptimizerKind,
    #[schemars(range(min = 0.0))]
    pub learning_rate: f64,
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub weight_decay: f64,
    /// Global L2 norm gradients are clipped to; absent means no clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    #[serde(default = "default_schedule")]
    pub schedule: LrSchedule,
    /// Linear warm-up, in optimiser steps.
    #[serde(default)]
    pub warmup_steps: u64,
}

fn default_schedule() -> LrSchedule {
    LrSchedule::Cosine
}

/// How a node's round update is stabilised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MomentumKind {
    /// Apply the round's update as it is.
    #[default]
    None,
    /// Apply an exponential moving average of round updates.
    Ema,
    /// Apply the round's update plus momentum along the post-gossip direction
    /// (quasi-global momentum).
    QuasiGlobal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MomentumSpec {
    #[serde(default)]
    pub kind: MomentumKind,
    #[serde(default = "default_beta")]
    #[schemars(range(min = 0.0, max = 0.999))]
    pub beta: f64,
}

impl Default for MomentumSpec {
    fn default() -> Self {
        MomentumSpec {
            kind: MomentumKind::None,
            beta: default_beta(),
        }
    }
}

fn default_beta() -> f64 {
    0.9
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AggregationRule {
    /// Gossip averaging with Metropolis-Hastings weights.
    #[default]
    MetropolisHastings,
    /// Metropolis-Hastings averaging with each neighbour's difference clipped to a radius
    /// taken from the distances seen in recent rounds (ClippedGossip, He, Karimireddy and
    /// Jaggi, 2022): a neighbour sending anything at all moves a node by at most its weight
    /// times that radius.
    ClippedGossip,
}

/// What members of different architectures average with each other. The smaller model's
/// layers keep the first channels of the larger's, so each of its weights is a slice of
/// the larger model's (the first layer's grey input channel standing for the sum of the
/// colour channels). A batch norm's scale and shift go with the convolution before it;
/// its running statistics always stay with each member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SharedLayers {
    /// Nothing: each architecture learns on its own. The default, since sharing pays only
    /// where the architectures' data are related enough, which the manifest's author knows.
    #[default]
    None,
    /// The convolutional feature extractor.
    Features,
    /// The feature extractor and the fully connected classifier; for members that learn
    /// the same classes.
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AggregationSpec {
    #[serde(default)]
    pub rule: AggregationRule,
    /// Consensus step size (gamma): how far a node moves toward its neighbours' estimates
    /// each round. 1 is plain gossip averaging; compressed exchange may want less.
    #[serde(default = "default_consensus_step")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub consensus_step: f64,
    /// For `clippedGossip`: the clipping radius as a multiple of the median neighbour
    /// distance of recent rounds.
    #[serde(default = "default_clip_factor")]
    #[schemars(range(min = 0.0))]
    pub clip_factor: f64,
    /// Layers shared between members of different architectures.
    #[serde(default)]
    pub cross_architecture: SharedLayers,
}

impl Default for AggregationSpec {
    fn default() -> Self {
        AggregationSpec {
            rule: AggregationRule::default(),
            consensus_step: default_consensus_step(),
            clip_factor: default_clip_factor(),
            cross_architecture: SharedLayers::default(),
        }
    }
}

fn default_consensus_step() -> f64 {
    1.0
}

fn default_clip_factor() -> f64 {
    1.0
}

/// Who exchanges with whom. Node order, where it matters (ring, k-regular), is the order of
/// the `DflNode` names sorted alphabetically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "camelCase")]
#[schemars(transform = crate::schema::fold_kind_tagged)]
pub enum Topology {
    /// Every node with every other.
    FullMesh,
    /// Each node with the next and the previous.
    Ring,
    /// Each node with the `degree / 2` next and previous nodes on a ring.
    #[serde(rename_all = "camelCase")]
    KRegular {
        #[schemars(range(min = 1))]
        degree: u32,
    },
    /// No links: every node trains alone; the baseline that shows what federating adds.
    Isolated,
    /// Named pairs of `DflNode`s; links are undirected.
    #[serde(rename_all = "camelCase")]
    Explicit { edges: Vec<[String; 2]> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CompressionKind {
    /// 32-bit floats.
    #[default]
    None,
    /// 16-bit floats.
    Fp16,
    /// 8-bit integers with a per-tensor scale.
    Int8,
    /// The largest-magnitude fraction of each tensor's entries.
    TopK,
    /// `bits`-bit integers with a scale per block of 256 entries.
    Quantized,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompressionSpec {
    #[serde(default)]
    pub kind: CompressionKind,
    /// Share of entries kept by top-k.
    #[serde(default = "default_topk_fraction")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub fraction: f64,
    /// Bits per entry for `quantized`, 2 to 8; 3 bits cut bytes about tenfold.
    #[serde(default = "default_quantized_bits")]
    #[schemars(range(min = 2, max = 8))]
    pub bits: u8,
}

impl Default for CompressionSpec {
    fn default() -> Self {
        CompressionSpec {
            kind: CompressionKind::None,
            fraction: default_topk_fraction(),
            bits: default_quantized_bits(),
        }
    }
}

fn default_topk_fraction() -> f64 {
    0.1
}

fn default_quantized_bits() -> u8 {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    /// Longest a node waits for its neighbours' updates after its own local training.
    #[serde(default = "default_deadline")]
    #[schemars(range(min = 0.1))]
    pub round_deadline_seconds: f64,
    /// Updates more than this many rounds old are dropped.
    #[serde(default = "default_staleness")]
    pub staleness_rounds: u64,
    #[serde(default)]
    pub compression: CompressionSpec,
}

impl Default for ExchangeSpec {
    fn default() -> Self {
        ExchangeSpec {
            round_deadline_seconds: default_deadline(),
            staleness_rounds: default_staleness(),
            compression: CompressionSpec::default(),
        }
    }
}

fn default_deadline() -> f64 {
    30.0
}

fn default_staleness() -> u64 {
    2
}

/// How training data is divided among the nodes that share a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "camelCase")]
#[schemars(transform = crate::schema::fold_kind_tagged)]
pub enum PartitionSpec {
    Iid,
    #[serde(rename_all = "camelCase")]
    Dirichlet {
        #[schemars(range(min = 0.0))]
        alpha: f64,
        #[serde(default)]
        min_per_node: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationSpec {
    /// Evaluate on the test split every this many rounds, and after the last.
    #[serde(default = "default_eval_every")]
    #[schemars(range(min = 1))]
    pub every_rounds: u64,
    /// Evaluate on at most this many test images, evenly spaced; 0 means all.
    #[serde(default)]
    pub test_limit: u32,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            every_rounds: default_eval_every(),
            test_limit: 0,
        }
    }
}

fn default_eval_every() -> u64 {
    5
}

/// What the federation as a whole is doing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederationRoundStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FederationPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_round: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consensus_distance: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FederationPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Degraded,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<crate::NodePhase>,
}

/// A Kubernetes-style status condition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// A topology that cannot be laid over the federation's nodes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TopologyError {
    #[error("topology.edges names {0:?}, which is not a node of this federation")]
    UnknownNode(String),
    #[error("topology.edges links {0:?} to itself")]
    SelfLoop(String),
    #[error("topology.degree {degree} is impossible with {nodes} nodes")]
    BadDegree { degree: u32, nodes: usize },
    #[error("topology.edges is empty")]
    Empty,
}

impl Topology {
    /// Each node's neighbours, for nodes named `names` (any order; sorted here).
    pub fn neighbours(
        &self,
        names: &[String],
    ) -> Result<BTreeMap<String, std::collections::BTreeSet<String>>, TopologyError> {
        let mut sorted: Vec<String> = names.to_vec();
        sorted.sort();
        let n = sorted.len();
        let mut links: BTreeMap<String, std::collections::BTreeSet<String>> = sorted
            .iter()
            .map(|s| (s.clone(), Default::default()))
            .collect();
        let mut link = |a: &str, b: &str| {
            links.get_mut(a).map(|s| s.insert(b.to_string()));
            links.get_mut(b).map(|s| s.insert(a.to_string()));
        };
        match self {
            Topology::FullMesh => {
                for (i, a) in sorted.iter().enumerate() {
                    for b in &sorted[i + 1..] {
                        link(a, b);
                    }
                }
            }
            Topology::Ring => {
                for i in 0..n {
                    let j = (i + 1) % n;
                    if i != j {
                        link(&sorted[i], &sorted[j]);
                    }
                }
            }
            Topology::KRegular { degree } => {
                let d = *degree as usize;
                if d == 0 || d >= n.max(1) || (d % 2 == 1 && n % 2 == 1) {
                    return Err(TopologyError::BadDegree {
                        degree: *degree,
                        nodes: n,
                    });
                }
                for i in 0..n {
                    for k in 1..=d / 2 {
                        link(&sorted[i], &sorted[(i + k) % n]);
                    }
                    // An odd degree (with an even node count) adds the opposite node.
                    if d % 2 == 1 {
                        link(&sorted[i], &sorted[(i + n / 2) % n]);
                    }
                }
            }
            Topology::Isolated => {}
            Topology::Explicit { edges } => {
                if edges.is_empty() {
                    return Err(TopologyError::Empty);
                }
                for [a, b] in edges {
                    for end in [a, b] {
                        if !sorted.contains(end) {
                            return Err(TopologyError::UnknownNode(end.clone()));
                        }
                    }
                    if a == b {
                        return Err(TopologyError::SelfLoop(a.clone()));
                    }
                    link(a, b);
                }
            }
        }
        Ok(links)
    }
}
