//! The configuration of every member of a federation, as the operator writes it into the
//! members' ConfigMaps. The format itself is shared with the node and the local launcher
//! (`edgesync_api::node_config`), so all three agree by construction.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use edgesync_api::node_config::dataset_key;
pub use edgesync_api::node_config::{MemberConfig, MemberModel, NodeConfig};
use edgesync_api::FederationRound;
use kube::ResourceExt;

use crate::federation::pod::METRICS_PORT;
use crate::identity::Identity;
use crate::names::{self, IDENTITY_DIR, IDENTITY_KEY, P2P_PORT, STATE_DIR};
use crate::validate::Plan;

/// A member the plan lists but no identity was given for; a bug in the caller.
#[derive(Debug, thiserror::Error)]
#[error("no identity was prepared for member {0}")]
pub struct MissingIdentity(pub String);

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
            model: MemberModel::of(&m.spec, m.classes),
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
                key_file: Path::new(IDENTITY_DIR).join(IDENTITY_KEY),
                listen: format!("/ip4/0.0.0.0/tcp/{P2P_PORT}"),
                members,
                state_dir: STATE_DIR.into(),
                threads: None,
                // All interfaces: the kubelet's probes and Prometheus come from outside the
                // pod's network namespace.
                metrics_address: Some(SocketAddr::from(([0, 0, 0, 0], METRICS_PORT as u16))),
            }
        })
        .collect();
    Ok(configs)
}
