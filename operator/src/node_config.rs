//! The configuration one node process reads (`dfl-node run --config`), as the operator
//! writes it into the member's ConfigMap.
//!
//! The node crate owns this format; it is mirrored here field for field rather than
//! imported, because the node crate links libtorch and the operator must stay a small
//! static binary. The tests pin every key name and the derived values (input channels,
//! dataset key) to what the node computes for the same spec.

use std::collections::BTreeMap;

use edgesync_api::{DatasetFormat, DflNodeSpec, FederationRound, FederationRoundSpec, ModelKind};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::federation::pod::METRICS_PORT;
use crate::identity::Identity;
use crate::names::{self, IDENTITY_DIR, IDENTITY_KEY, P2P_PORT, STATE_DIR};
use crate::validate::Plan;

/// One node's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    pub federation: String,
    pub name: String,
    pub federation_spec: FederationRoundSpec,
    pub node_spec: DflNodeSpec,
    /// File holding the node's keypair (libp2p protobuf encoding).
    pub key_file: String,
    /// Multiaddress the node listens on.
    pub listen: String,
    /// Every member, the node itself included.
    pub members: Vec<MemberConfig>,
    /// Where the node writes checkpoints.
    pub state_dir: String,
    /// libtorch CPU threads; absent keeps libtorch's default.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Address the node serves `/metrics`, `/healthz` and `/readyz` on. Absent in the
    /// configurations of runs started by earlier operators, whose nodes serve none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
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

/// Enough about a member's model to know which parameters it shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberModel {
    pub kind: ModelKind,
    pub in_channels: i64,
    pub classes: i64,
}

/// A member the plan lists but no identity was given for; a bug in the caller.
#[derive(Debug, thiserror::Error)]
#[error("no identity was prepared for member {0}")]
pub struct MissingIdentity(pub String);

impl NodeConfig {
    /// The configuration text the node reads.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    pub fn from_yaml(text: &str) -> Result<NodeConfig, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    /// This node's own entry in the member list.
    pub fn me(&self) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.name == self.name)
    }
}

/// Every member's configuration, in the plan's member order.
pub fn build(
    fed: &FederationRound,
    namespace: &str,
    plan: &Plan,
    identities: &BTreeMap<String, Identity>,
    cluster_domain: &str,
) -> Result<Vec<NodeConfig>, MissingIdentity> {
    let fed_name = fed.name_any();
    let mut entries = Vec::with_capacity(plan.members.len());
    for m in &plan.members {
        let identity = identities
            .get(&m.name)
            .ok_or_else(|| MissingIdentity(m.name.clone()))?;
        entries.push(MemberConfig {
            name: m.name.clone(),
            peer_id: identity.peer_id.clone(),
            addresses: vec![names::member_address(
                &fed_name,
                &m.name,
                namespace,
                cluster_domain,
            )],
            model: MemberModel {
                kind: m.spec.model,
                in_channels: input_channels(&m.spec),
                classes: m.classes,
            },
            dataset_key: dataset_key(&m.spec),
            neighbour: false,
        });
    }
    let configs = plan
        .members
        .iter()
        .map(|me| {
            let neighbours = plan.neighbours.get(&me.name);
            let members = entries
                .iter()
                .map(|e| MemberConfig {
                    neighbour: neighbours.is_some_and(|n| n.contains(&e.name)),
                    ..e.clone()
                })
                .collect();
            NodeConfig {
                federation: fed_name.clone(),
                name: me.name.clone(),
                federation_spec: fed.spec.clone(),
                node_spec: me.spec.clone(),
                key_file: format!("{IDENTITY_DIR}/{IDENTITY_KEY}"),
                listen: format!("/ip4/0.0.0.0/tcp/{P2P_PORT}"),
                members,
                state_dir: STATE_DIR.to_string(),
                threads: None,
                // All interfaces: the kubelet's probes and Prometheus come from outside the
                // pod's network namespace.
                metrics_address: Some(format!("0.0.0.0:{METRICS_PORT}")),
            }
        })
        .collect();
    Ok(configs)
}

/// Colour channels of a node's model: one for grayscale and digit data, three otherwise.
/// Must agree with the node, which converts its images to match.
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

/// Members reading the same folder in the same format split it; must agree with the node.
pub fn dataset_key(spec: &DflNodeSpec) -> String {
    format!("{:?}:{}", spec.dataset.format, spec.dataset.path)
}

#[cfg(test)]
mod tests {
    use edgesync_api::{DatasetRef, Hardware, Placement};

    use super::*;

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
    fn channels_and_dataset_keys_follow_the_node() {
        assert_eq!(input_channels(&spec(DatasetFormat::Mnist, false)), 1);
        assert_eq!(input_channels(&spec(DatasetFormat::Cifar10Bin, false)), 3);
        assert_eq!(input_channels(&spec(DatasetFormat::ImageFolder, true)), 1);
        assert_eq!(
            dataset_key(&spec(DatasetFormat::Cifar10Bin, false)),
            "Cifar10Bin:/data/x"
        );
    }
}
