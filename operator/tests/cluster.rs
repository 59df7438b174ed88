//! End-to-end checks against a real cluster. They run only when KUBECONFIG names one, and
//! need rights to install CRDs and create namespaces; elsewhere they say they were skipped.
//!
//! The test installs the CRDs, creates a throw-away namespace with a federation of two CPU
//! nodes, reconciles it once, checks the objects the API server now holds, reconciles again
//! to check that identities are kept, and deletes the namespace.

use std::sync::Arc;

use edgesync_api::{DflNode, FederationRound};
use edgesync_operator::context::Context;
use edgesync_operator::federation;
use edgesync_operator::metrics::Metrics;
use edgesync_operator::settings::NodePodSettings;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt, ResourceExt};

fn manifests(ns: &str) -> (FederationRound, Vec<DflNode>) {
    let fed = format!(
        r#"
apiVersion: edgesync.dev/v1alpha1
kind: FederationRound
metadata: {{name: e2e, namespace: {ns}}}
spec:
  rounds: 1
  localSteps: 1
  batchSize: 8
  optimizer: {{kind: adam, learningRate: 0.001}}
  topology: {{kind: fullMesh}}
  partition: {{kind: iid}}
  nodeSelector: {{matchLabels: {{edgesync.dev/federation: e2e}}}}
"#
    );
    let node = |name: &str| {
        format!(
            r#"
apiVersion: edgesync.dev/v1alpha1
kind: DflNode
metadata: {{name: {name}, namespace: {ns}, labels: {{edgesync.dev/federation: e2e}}}}
spec:
  hardware: cpu
  model: akida-cnn
  dataset: {{format: mnist, path: /var/lib/edgesync-e2e/mnist}}
"#
        )
    };
    (
        serde_yaml::from_str(&fed).expect("federation"),
        vec![
            serde_yaml::from_str(&node("n1")).expect("node"),
            serde_yaml::from_str(&node("n2")).expect("node"),
        ],
    )
}

#[tokio::test]
async fn a_federation_reconciles_on_a_real_cluster() {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("skipped: KUBECONFIG not set");
        return;
    }
    let client = Client::try_default().await.expect("cluster client");
    let apply = PatchParams::apply("edgesync-operator-e2e").force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [FederationRound::crd(), DflNode::crd()] {
        crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd))
            .await
            .expect("install CRD");
    }
    // A new CRD takes a moment to be served.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let ns = format!("edgesync-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");

    let (fed, nodes) = manifests(&ns);
    let nodes_api: Api<DflNode> = Api::namespaced(client.clone(), &ns);
    for node in &nodes {
        nodes_api
            .create(&PostParams::default(), node)
            .await
            .expect("create node");
    }
    let feds: Api<FederationRound> = Api::namespaced(client.clone(), &ns);
    let fed = feds
        .create(&PostParams::default(), &fed)
        .await
        .expect("create federation");

    let ctx = Context::new(
        client.clone(),
        NodePodSettings::default(),
        Arc::new(Metrics::new().expect("metrics")),
        Some("e2e".into()),
    );
    let outcome = federation::reconcile_steps(&fed, &ctx)
        .await
        .expect("first pass");
    assert_eq!(outcome.pods_created, 2, "{outcome:?}");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services.get("e2e-p2p").await.expect("headless service");
    let pod = pods.get("e2e-n1").await.expect("pod of n1");
    assert_eq!(pod.owner_references()[0].name, "e2e");
    let key = secrets.get("e2e-n1-identity").await.expect("identity").data;

    let fed = feds.get("e2e").await.expect("federation");
    let status = fed.status.clone().expect("status written");
    assert_eq!(status.conditions[0].status, "True", "{status:?}");
    federation::reconcile_steps(&fed, &ctx)
        .await
        .expect("second pass");
    let again = secrets.get("e2e-n1-identity").await.expect("identity").data;
    assert_eq!(key, again, "the identity must be kept");

    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("delete namespace");
}
