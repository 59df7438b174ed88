//! Reading a federation manifest: one YAML file (or stream) holding a `FederationRound`
//! and the `DflNode`s it selects, the same documents `kubectl apply -f` takes.

use std::collections::{BTreeMap, BTreeSet};

use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::{DflNode, FederationRound, TopologyError};

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub federation: FederationRound,
    /// The selected nodes, sorted by name.
    pub nodes: Vec<DflNode>,
    /// Each node's neighbours under the federation's topology.
    pub neighbours: BTreeMap<String, BTreeSet<String>>,
}

/// Why a manifest was refused; each names the document and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {index} ({kind}): field {path}: {message}")]
    Field {
        index: usize,
        kind: String,
        path: String,
        message: String,
    },
    #[error(
        "document {index}: apiVersion {api_version:?} kind {kind:?} is not an EdgeSync \
             resource (expected apiVersion edgesync.dev/v1alpha1, kind FederationRound or \
             DflNode)"
    )]
    UnknownKind {
        index: usize,
        api_version: String,
        kind: String,
    },
    #[error("the manifest holds {0} FederationRound documents; it needs exactly one")]
    FederationCount(usize),
    #[error("FederationRound {federation}: spec.nodeSelector selects no DflNode")]
    NoNodes { federation: String },
    #[error("DflNode name {0:?} appears twice")]
    DuplicateNode(String),
    #[error("{0:?} is missing metadata.name")]
    MissingName(String),
    #[error("FederationRound {federation}: {}", join(.problems))]
    OutOfRange {
        federation: String,
        problems: Vec<crate::OutOfRange>,
    },
    #[error("FederationRound {federation}: spec.{source}")]
    Topology {
        federation: String,
        #[source]
        source: TopologyError,
    },
}

impl Manifest {
    /// Parses and validates every document of `text`.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let mut federations: Vec<FederationRound> = Vec::new();
        let mut nodes: Vec<DflNode> = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(document)
                .map_err(|source| ManifestError::Yaml { index, source })?;
            if value.is_null() {
                continue;
            }
            let field = |key: &str| {
                value
                    .get(key)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let (api_version, kind) = (field("apiVersion"), field("kind"));
            let expected_api = format!("{}/{}", crate::GROUP, crate::VERSION);
            match (api_version == expected_api, kind.as_str()) {
                (true, "FederationRound") => federations.push(typed(index, &kind, value)?),
                (true, "DflNode") => nodes.push(typed(index, &kind, value)?),
                _ => {
                    return Err(ManifestError::UnknownKind {
                        index,
                        api_version,
                        kind,
                    })
                }
            }
        }

        if federations.len() != 1 {
            return Err(ManifestError::FederationCount(federations.len()));
        }
        let federation = federations.remove(0);
        let federation_name = federation.name_any();
        if federation.meta().name.is_none() {
            return Err(ManifestError::MissingName("FederationRound".into()));
        }

        let problems = federation.spec.out_of_range();
        if !problems.is_empty() {
            return Err(ManifestError::OutOfRange {
                federation: federation_name,
                problems,
            });
        }

        let mut seen = BTreeSet::new();
        for node in &nodes {
            let name = node
                .meta()
                .name
                .clone()
                .ok_or_else(|| ManifestError::MissingName("DflNode".into()))?;
            if !seen.insert(name.clone()) {
                return Err(ManifestError::DuplicateNode(name));
            }
        }
        let selector = &federation.spec.node_selector;
        let mut selected: Vec<DflNode> = nodes
            .into_iter()
            .filter(|n| selector.matches(n.labels()))
            .collect();
        if selected.is_empty() {
            return Err(ManifestError::NoNodes {
                federation: federation_name,
            });
        }
        selected.sort_by_key(|n| n.name_any());
        let names: Vec<String> = selected.iter().map(|n| n.name_any()).collect();
        let neighbours = federation
            .spec
            .topology
            .neighbours(&names)
            .map_err(|source| ManifestError::Topology {
                federation: federation_name.clone(),
                source,
            })?;
        Ok(Manifest {
            federation,
            nodes: selected,
            neighbours,
        })
    }
}

fn join(problems: &[crate::OutOfRange]) -> String {
    let texts: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    texts.join("; ")
}

/// Deserialises one document, naming the exact field that failed.
fn typed<T: DeserializeOwned>(
    index: usize,
    kind: &str,
    value: serde_yaml::Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|err| ManifestError::Field {
        index,
        kind: kind.to_string(),
        path: err.path().to_string(),
        message: err.inner().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEDERATION: &str = r#"
apiVersion: edgesync.dev/v1alpha1
kind: FederationRound
metadata: {name: demo}
spec:
  rounds: 3
  localSteps: 5
  batchSize: 32
  optimizer: {kind: adam, learningRate: 0.001}
  topology: {kind: ring}
  partition: {kind: dirichlet, alpha: 0.5, minPerNode: 10}
  nodeSelector: {matchLabels: {federation: demo}}
"#;

    fn node(name: &str, federation: &str) -> String {
        format!(
            r#"
---
apiVersion: edgesync.dev/v1alpha1
kind: DflNode
metadata: {{name: {name}, labels: {{federation: {federation}}}}}
spec:
  hardware: cpu
  model: jetson-cnn
  dataset: {{format: mnist, path: data/mnist}}
"#
        )
    }

    #[test]
    fn selects_nodes_and_lays_the_topology() {
        let text = format!(
            "{FEDERATION}{}{}{}{}",
            node("c", "demo"),
            node("a", "demo"),
            node("b", "demo"),
            node("x", "other")
        );
        let m = Manifest::parse(&text).unwrap();
        let names: Vec<String> = m.nodes.iter().map(|n| n.name_any()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(m.neighbours["a"], BTreeSet::from(["b".into(), "c".into()]));
        assert_eq!(m.federation.spec.exchange.staleness_rounds, 2);
    }

    #[test]
    fn bad_field_is_named() {
        let text = FEDERATION.replace("kind: ring", "kind: star");
        let err = Manifest::parse(&format!("{text}{}", node("a", "demo"))).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("spec.topology") && msg.contains("star"),
            "{msg}"
        );

        let text = FEDERATION.replace("rounds: 3", "rounds: three");
        let msg = Manifest::parse(&text).unwrap_err().to_string();
        assert!(msg.contains("spec.rounds"), "{msg}");
    }

    #[test]
    fn values_out_of_range_are_all_named() {
        let text = FEDERATION
            .replace("rounds: 3", "rounds: 0")
            .replace(
                "topology: {kind: ring}",
                "topology: {kind: ring}\n  exchange: {compression: {kind: quantized, bits: 12}}",
            )
            .replace("alpha: 0.5", "alpha: 0.0");
        let msg = Manifest::parse(&format!("{text}{}", node("a", "demo")))
            .unwrap_err()
            .to_string();
        for field in ["spec.rounds is 0", "spec.exchange.compression.bits is 12"] {
            assert!(msg.contains(field), "{msg}");
        }
        assert!(msg.contains("spec.partition.alpha is 0"), "{msg}");
    }

    #[test]
    fn structural_errors_are_reported() {
        let msg = Manifest::parse(&node("a", "demo")).unwrap_err().to_string();
        assert!(msg.contains("0 FederationRound"), "{msg}");

        let msg = Manifest::parse(&format!("{FEDERATION}{}", node("x", "other")))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("selects no DflNode"), "{msg}");

        let text = format!("{FEDERATION}{}{}", node("a", "demo"), node("a", "demo"));
        assert!(matches!(
            Manifest::parse(&text),
            Err(ManifestError::DuplicateNode(_))
        ));

        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n";
        let msg = Manifest::parse(text).unwrap_err().to_string();
        assert!(msg.contains("kind \"Pod\""), "{msg}");

        let text = FEDERATION.replace("{kind: ring}", "{kind: explicit, edges: [[a, ghost]]}");
        let msg = Manifest::parse(&format!("{text}{}", node("a", "demo")))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("ghost"), "{msg}");
    }

    #[test]
    fn topologies_have_the_expected_degrees() {
        let names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
        let degree = |t: &crate::Topology| -> Vec<usize> {
            t.neighbours(&names)
                .unwrap()
                .values()
                .map(|s| s.len())
                .collect()
        };
        assert!(degree(&crate::Topology::FullMesh).iter().all(|&d| d == 5));
        assert!(degree(&crate::Topology::Ring).iter().all(|&d| d == 2));
        let k4 = crate::Topology::KRegular { degree: 4 };
        assert!(degree(&k4).iter().all(|&d| d == 4));
        let k3 = crate::Topology::KRegular { degree: 3 };
        assert!(degree(&k3).iter().all(|&d| d == 3));
        let bad = crate::Topology::KRegular { degree: 6 };
        assert!(bad.neighbours(&names).is_err());
    }
}
