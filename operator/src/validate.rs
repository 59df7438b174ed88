//! Checks a federation's spec against what a cluster run needs, without touching the API
//! server: which hardware trains which model, names that must be DNS labels, host paths,
//! quantities and the topology. Every problem found is reported, not only the first.
//!
//! Hardware classes and models are closed enums in the CRD schema, so the API server
//! already refuses an unknown class; what is left to check here are combinations.

use std::collections::{BTreeMap, BTreeSet};

use edgesync_api::{DatasetFormat, DflNode, DflNodeSpec, FederationRound, Hardware, ModelKind};
use kube::ResourceExt;

use crate::names::{self, ANNOTATION_CLASSES, ANNOTATION_DATA_CLAIM};

/// Classes of the built-in datasets (CIFAR-10, MNIST, Fashion-MNIST).
const BUILT_IN_CLASSES: i64 = 10;
/// Folders the node pod mounts for itself; the data, mounted at its host path, must not
/// land on or over one of them.
const RESERVED_PATHS: [&str; 4] = [
    names::CONFIG_DIR,
    names::IDENTITY_DIR,
    names::STATE_DIR,
    "/tmp",
];

/// One member of a run as the builders need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub spec: DflNodeSpec,
    /// Classes of the member's classifier.
    pub classes: i64,
    /// PersistentVolumeClaim holding the data, when not a host path.
    pub data_claim: Option<String>,
}

/// A federation that can run: its members sorted by name and who neighbours whom.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub members: Vec<Member>,
    pub neighbours: BTreeMap<String, BTreeSet<String>>,
}

/// Something in a spec that keeps a federation from running. Each names the object and
/// field at fault; [`Invalid::reason`] is the condition and event reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("spec.nodeSelector {selector} selects no DflNode in this namespace")]
    NoNodes { selector: String },
    #[error(
        "DflNode {node}: hardware {hardware} runs model akida-cnn only (Akida executes the \
         quantisable half-width network), not {model}"
    )]
    UnsupportedModel {
        node: String,
        hardware: &'static str,
        model: &'static str,
    },
    /// The topology's own error text, which names the field (`topology.edges`, ...).
    #[error("spec.{0}")]
    Topology(String),
    #[error("{what} name {name:?} {problem}")]
    Name {
        what: &'static str,
        name: String,
        problem: String,
    },
    #[error(
        "DflNode {node}: spec.dataset.path {path:?} must be an absolute host path without \
         '..', other than / and outside the folders the pod mounts itself ({})",
        RESERVED_PATHS.join(", ")
    )]
    DatasetPath { node: String, path: String },
    #[error("DflNode {node}: spec.resources.{field} {value:?} is not a Kubernetes quantity")]
    Quantity {
        node: String,
        field: &'static str,
        value: String,
    },
    #[error(
        "DflNode {node}: an image-folder dataset needs annotation {ANNOTATION_CLASSES} set to \
         its number of classes (an integer from 2 to 100000); found {found:?}"
    )]
    Classes { node: String, found: Option<String> },
    #[error(
        "DflNode {node}: the identity Secret cannot be used ({detail}); delete it and \
             re-create the FederationRound to start a new run with new identities"
    )]
    Identity { node: String, detail: String },
    #[error(
        "members {missing:?} of the running federation lost their ConfigMaps and the spec \
         changed since the run started, so their configuration cannot be rebuilt; delete and \
         re-create the FederationRound to start a new run"
    )]
    IncompleteRun { missing: Vec<String> },
    #[error("ConfigMap {config_map} of the running federation cannot be read: {detail}")]
    RunConfig { config_map: String, detail: String },
}

impl Invalid {
    /// CamelCase reason for conditions and events; a fixed set.
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::NoNodes { .. } => "NoNodesSelected",
            Invalid::UnsupportedModel { .. } => "UnsupportedModel",
            Invalid::Topology(_) => "InvalidTopology",
            Invalid::Name { .. } => "InvalidName",
            Invalid::DatasetPath { .. } => "InvalidDatasetPath",
            Invalid::Quantity { .. } => "InvalidResources",
            Invalid::Classes { .. } => "MissingClassCount",
            Invalid::Identity { .. } => "InvalidIdentity",
            Invalid::IncompleteRun { .. } => "IncompleteRun",
            Invalid::RunConfig { .. } => "InvalidRunConfiguration",
        }
    }
}

/// Problems of one `DflNode` on its own.
pub fn node_problems(node: &DflNode) -> Vec<Invalid> {
    let name = node.name_any();
    let spec = &node.spec;
    let mut out = Vec::new();
    if let Some(problem) = names::dns_label_problem(&name) {
        out.push(Invalid::Name {
            what: "DflNode",
            name: name.clone(),
            problem,
        });
    }
    if spec.hardware == Hardware::Akida && spec.model != ModelKind::AkidaCnn {
        out.push(Invalid::UnsupportedModel {
            node: name.clone(),
            hardware: "akida",
            model: model_name(spec.model),
        });
    }
    if !is_dataset_path(&spec.dataset.path) {
        out.push(Invalid::DatasetPath {
            node: name.clone(),
            path: spec.dataset.path.clone(),
        });
    }
    if let Some(resources) = &spec.resources {
        for (field, value) in [("cpu", &resources.cpu), ("memory", &resources.memory)] {
            if let Some(value) = value.as_ref().filter(|v| !is_quantity(v)) {
                out.push(Invalid::Quantity {
                    node: name.clone(),
                    field,
                    value: value.clone(),
                });
            }
        }
    }
    if let Err(problem) = classes(node) {
        out.push(problem);
    }
    if let Some(claim) = node.annotations().get(ANNOTATION_DATA_CLAIM) {
        if let Some(problem) = names::dns_label_problem(claim) {
            out.push(Invalid::Name {
                what: "PersistentVolumeClaim",
                name: claim.clone(),
                problem,
            });
        }
    }
    out
}

/// Checks a federation and the nodes its selector picked; on success, the plan to build.
pub fn federation(fed: &FederationRound, nodes: &[DflNode]) -> Result<Plan, Vec<Invalid>> {
    let fed_name = fed.name_any();
    let mut problems = Vec::new();
    // The headless Service is named after the federation and must be a DNS-1035 label.
    let service = names::service_name(&fed_name);
    if let Some(problem) = names::dns_label_problem(&service) {
        problems.push(Invalid::Name {
            what: "Service (from the FederationRound)",
            name: service,
            problem,
        });
    } else if !fed_name.starts_with(|c: char| c.is_ascii_lowercase()) {
        problems.push(Invalid::Name {
            what: "FederationRound",
            name: fed_name.clone(),
            problem: "must start with a letter (it names a Service)".into(),
        });
    }

    let selected: Vec<&DflNode> = nodes
        .iter()
        .filter(|n| fed.spec.node_selector.matches(n.labels()))
        .collect();
    if selected.is_empty() {
        problems.push(Invalid::NoNodes {
            selector: names::selector_text(&fed.spec.node_selector.match_labels),
        });
        return Err(problems);
    }

    let mut members = Vec::new();
    for node in &selected {
        let node_problems = node_problems(node);
        let name = node.name_any();
        let pod = names::member_name(&fed_name, &name);
        if let Some(problem) = names::dns_label_problem(&pod) {
            problems.push(Invalid::Name {
                what: "pod (federation and node names joined)",
                name: pod,
                problem,
            });
        }
        if node_problems.is_empty() {
            members.push(Member {
                name,
                spec: node.spec.clone(),
                classes: classes(node).unwrap_or(BUILT_IN_CLASSES),
                data_claim: node.annotations().get(ANNOTATION_DATA_CLAIM).cloned(),
            });
        }
        problems.extend(node_problems);
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));

    let names: Vec<String> = selected.iter().map(|n| n.name_any()).collect();
    let neighbours = match fed.spec.topology.neighbours(&names) {
        Ok(n) => n,
        Err(e) => {
            problems.push(Invalid::Topology(e.to_string()));
            BTreeMap::new()
        }
    };
    if problems.is_empty() {
        Ok(Plan {
            members,
            neighbours,
        })
    } else {
        Err(problems)
    }
}

fn model_name(model: ModelKind) -> &'static str {
    match model {
        ModelKind::JetsonCnn => "jetson-cnn",
        ModelKind::AkidaCnn => "akida-cnn",
    }
}

/// Classes of a node's classifier: fixed for the built-in datasets, from an annotation for
/// image folders.
fn classes(node: &DflNode) -> Result<i64, Invalid> {
    if node.spec.dataset.format != DatasetFormat::ImageFolder {
        return Ok(BUILT_IN_CLASSES);
    }
    let found = node.annotations().get(ANNOTATION_CLASSES).cloned();
    match found.as_deref().map(str::parse::<i64>) {
        Some(Ok(n)) if (2..=100_000).contains(&n) => Ok(n),
        _ => Err(Invalid::Classes {
            node: node.name_any(),
            found,
        }),
    }
}

/// The data is mounted in the pod at its host path, so that path must be usable there.
fn is_dataset_path(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    let inside =
        |outer: &str, inner: &str| inner == outer || inner.starts_with(&format!("{outer}/"));
    path.starts_with('/')
        && !path.split('/').any(|c| c == "..")
        && !RESERVED_PATHS
            .iter()
            .any(|r| inside(path, r) || inside(r, path))
}

/// A Kubernetes quantity: a decimal number with an optional exponent or SI / binary suffix.
fn is_quantity(text: &str) -> bool {
    const SUFFIXES: [&str; 15] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E",
    ];
    let text = text.strip_prefix('+').unwrap_or(text);
    let number = SUFFIXES
        .iter()
        .find_map(|s| text.strip_suffix(s))
        .unwrap_or(text);
    let (mantissa, exponent) = match number.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (number, None),
    };
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((i, f)) => {
            (digits(i) || i.is_empty()) && (digits(f) || f.is_empty()) && mantissa != "."
        }
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_paths() {
        assert!(is_dataset_path("/srv/data/cifar10"));
        assert!(is_dataset_path("/srv/data/cifar10/"));
        for bad in [
            "data/x",
            "/",
            "/srv/../etc",
            "/etc/edgesync",
            "/etc",
            "/tmp/x",
            "",
        ] {
            assert!(!is_dataset_path(bad), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        for ok in ["1", "500m", "1.5", "2Gi", "512Mi", "1e3", "0.5", ".5", "+1"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "one", "1 Gi", "1GB", ".", "1e", "-1", "5mm"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
