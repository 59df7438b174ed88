//! The first step of a reconciliation: read what exists. The `DflNode`s the federation
//! selects, and the ConfigMaps, Secrets and Pods this `FederationRound` owns; then, from the
//! ConfigMaps alone, which run is in progress.
//!
//! A run is defined by its members' ConfigMaps: they hold the configuration each node
//! started with, including the full member list, so a pod recreated later gets exactly
//! what its peers expect.

use std::collections::{BTreeMap, BTreeSet};

use edgesync_api::{DflNode, FederationRound};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::names::{self, ANNOTATION_DATA_CLAIM, CONFIG_KEY, LABEL_FEDERATION};
use crate::node_config::NodeConfig;
use crate::validate::Invalid;
use crate::Error;

/// What exists for one federation.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// `DflNode`s matching the federation's selector.
    pub nodes: Vec<DflNode>,
    pub config_maps: Vec<ConfigMap>,
    pub secrets: Vec<Secret>,
    pub pods: Vec<Pod>,
}

impl Observed {
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| s.name_any() == name)
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name_any() == name)
    }
}

/// Lists what exists. Objects carrying the federation's label but owned by another object
/// (a deleted `FederationRound` of the same name whose objects the garbage collector has
/// not removed yet) are left out.
pub async fn observe(
    client: &Client,
    fed: &FederationRound,
    namespace: &str,
) -> Result<Observed, Error> {
    let uid = fed.meta().uid.clone().ok_or(Error::Incomplete {
        kind: "FederationRound",
        field: "metadata.uid",
    })?;
    let selector = names::selector_text(&fed.spec.node_selector.match_labels);
    let nodes: Vec<DflNode> = list(client, namespace, &selector).await?;
    let owned = format!("{LABEL_FEDERATION}={}", fed.name_any());
    let mine = |meta: &kube::core::ObjectMeta| {
        meta.owner_references.iter().flatten().any(|o| o.uid == uid)
    };
    let config_maps: Vec<ConfigMap> = list(client, namespace, &owned).await?;
    let secrets: Vec<Secret> = list(client, namespace, &owned).await?;
    let pods: Vec<Pod> = list(client, namespace, &owned).await?;
    Ok(Observed {
        // The API server applied the selector; matching again guards the pure steps
        // against a selector the server reads differently.
        nodes: nodes
            .into_iter()
            .filter(|n| fed.spec.node_selector.matches(n.labels()))
            .collect(),
        config_maps: config_maps.into_iter().filter(|o| mine(o.meta())).collect(),
        secrets: secrets.into_iter().filter(|o| mine(o.meta())).collect(),
        pods: pods.into_iter().filter(|o| mine(o.meta())).collect(),
    })
}

async fn list<K>(client: &Client, namespace: &str, selector: &str) -> Result<Vec<K>, Error>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = if selector.is_empty() {
        ListParams::default()
    } else {
        ListParams::default().labels(selector)
    };
    Ok(api.list(&params).await?.items)
}

/// A member of the run in progress, as its ConfigMap records it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningMember {
    pub config: NodeConfig,
    pub data_claim: Option<String>,
}

/// The run in progress: members with a ConfigMap, and every member any of them lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    pub configs: BTreeMap<String, RunningMember>,
    pub members: BTreeSet<String>,
}

impl Run {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Reads the run from the federation's ConfigMaps. A ConfigMap that no longer parses is a
/// problem to report; the others still count.
pub fn run_of(config_maps: &[ConfigMap]) -> (Run, Vec<Invalid>) {
    let mut run = Run::default();
    let mut problems = Vec::new();
    for cm in config_maps {
        let text = cm.data.as_ref().and_then(|d| d.get(CONFIG_KEY));
        let parsed = text
            .ok_or_else(|| format!("it has no {CONFIG_KEY:?} entry"))
            .and_then(|t| NodeConfig::parse(t).map_err(|e| e.to_string()))
            .and_then(|c| match c.me() {
                Some(_) => Ok(c),
                None => Err(format!("its member list does not include {:?}", c.name)),
            });
        match parsed {
            Ok(config) => {
                run.members
                    .extend(config.members.iter().map(|m| m.name.clone()));
                run.members.insert(config.name.clone());
                let data_claim = cm.annotations().get(ANNOTATION_DATA_CLAIM).cloned();
                run.configs
                    .insert(config.name.clone(), RunningMember { config, data_claim });
            }
            Err(detail) => problems.push(Invalid::RunConfig {
                config_map: cm.name_any(),
                detail,
            }),
        }
    }
    (run, problems)
}
