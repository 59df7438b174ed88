//! `edgesync-operator render`: the objects the operator would create for a manifest, without
//! a cluster. Useful to review a federation before applying it, and to check the objects
//! against the Kubernetes schemas offline.
//!
//! Identities are generated afresh on every call, and owner references carry a placeholder
//! uid, since the `FederationRound` does not exist yet.

use std::fmt::Write as _;

use edgesync_api::Manifest;
use kube::ResourceExt;
use serde::Serialize;

use crate::federation::build::{self, Desired};
use crate::federation::objects::{self, BuildError};
use crate::federation::observe::{Observed, Run};
use crate::identity::{Identity, IdentityError};
use crate::settings::NodePodSettings;
use crate::validate::{self, Invalid};

/// Owner uid of rendered objects; the API server assigns the real one.
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// Why a manifest could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Manifest(#[from] edgesync_api::ManifestError),
    #[error("the manifest cannot run on a cluster: {}", list(.0))]
    Invalid(Vec<Invalid>),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

fn list(problems: &[Invalid]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every object of the run `manifest` describes, as a YAML stream, in `namespace` unless
/// the `FederationRound` names its own.
pub fn render(
    manifest: &str,
    namespace: &str,
    settings: &NodePodSettings,
) -> Result<String, RenderError> {
    let manifest = Manifest::parse(manifest)?;
    let mut fed = manifest.federation;
    let namespace = fed.namespace().unwrap_or_else(|| namespace.to_string());
    fed.metadata.namespace = Some(namespace.clone());
    fed.metadata.uid = Some(PLACEHOLDER_UID.to_string());
    let owner = objects::owner_reference(&fed)?;

    let plan = validate::federation(&fed, &manifest.nodes).map_err(RenderError::Invalid)?;
    let (observed, run) = (Observed::default(), Run::default());
    let sources = build::sources(&run, &fed.spec, Some(&plan));
    let ids = build::identities(
        &fed.name_any(),
        &observed,
        &run,
        &sources,
        Identity::generate,
    )?;
    let desired = build::desired(&build::Inputs {
        fed: &fed,
        namespace: &namespace,
        owner: &owner,
        observed: &observed,
        run: &run,
        plan: Some(&plan),
        sources: &sources,
        ids: &ids,
        settings,
    })?;
    to_yaml(&desired)
}

fn to_yaml(desired: &Desired) -> Result<String, RenderError> {
    let mut out = String::new();
    let mut push = |object: &dyn erased::Object| -> Result<(), RenderError> {
        // Writing to a String cannot fail.
        let _ = write!(out, "---\n{}", object.yaml()?);
        Ok(())
    };
    if let Some(service) = &desired.service {
        push(service)?;
    }
    for m in &desired.members {
        if let Some(secret) = &m.secret {
            push(secret)?;
        }
        if let Some(cm) = &m.config_map {
            push(cm)?;
        }
        if let Some(w) = &m.workload {
            push(&w.account)?;
            push(&w.role)?;
            push(&w.binding)?;
            push(&w.pod)?;
        }
    }
    Ok(out)
}

/// Lets objects of different types go through one writer.
mod erased {
    pub trait Object {
        fn yaml(&self) -> Result<String, serde_yaml::Error>;
    }

    impl<T: super::Serialize> Object for T {
        fn yaml(&self) -> Result<String, serde_yaml::Error> {
            serde_yaml::to_string(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
apiVersion: edgesync.dev/v1alpha1
kind: FederationRound
metadata: {name: lab}
spec:
  rounds: 3
  localSteps: 5
  batchSize: 32
  optimizer: {kind: adam, learningRate: 0.001}
  topology: {kind: ring}
  partition: {kind: iid}
  nodeSelector: {matchLabels: {federation: lab}}
---
apiVersion: edgesync.dev/v1alpha1
kind: DflNode
metadata: {name: a, labels: {federation: lab}}
spec:
  hardware: jetson
  model: jetson-cnn
  dataset: {format: mnist, path: /data/mnist}
"#;

    #[test]
    fn a_manifest_renders_every_object_of_its_run() {
        let yaml = render(MANIFEST, "edge", &NodePodSettings::default()).unwrap();
        let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| {
                let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
                v["kind"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Service",
                "Secret",
                "ConfigMap",
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "Pod"
            ]
        );
        assert!(yaml.contains("namespace: edge"));
    }

    #[test]
    fn a_manifest_that_cannot_run_on_a_cluster_is_refused_with_reasons() {
        let relative = MANIFEST.replace("/data/mnist", "data/mnist");
        let err = render(&relative, "edge", &NodePodSettings::default()).unwrap_err();
        assert!(err.to_string().contains("spec.dataset.path"), "{err}");
    }
}
