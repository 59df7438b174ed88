//! The `FederationRound` reconciler against a mock API server that checks every request of
//! a scenario: method, path, field manager and the kind of what is applied.

mod common;

use std::sync::Arc;

use common::{
    json_of, lists, mk_federation, mk_node, mock_client, running_pod, started, ApiServer,
    CONFIG_MAPS, NODES, PODS, SECRETS, STATUS, WAIT,
};
use edgesync_api::{DflNodeStatus, NodePhase};
use edgesync_operator::context::Context;
use edgesync_operator::federation::{self, Outcome};
use edgesync_operator::metrics::Metrics;
use edgesync_operator::settings::NodePodSettings;
use http::Method;
use kube::runtime::controller::Action;
use serde_json::json;

fn context(client: kube::Client) -> Arc<Context> {
    let metrics = Arc::new(Metrics::new().unwrap());
    Arc::new(Context::new(
        client,
        NodePodSettings::default(),
        metrics,
        Some("test".into()),
    ))
}

/// Runs one reconciliation against `script`, failing if either side takes too long.
async fn scenario<F>(fed: edgesync_api::FederationRound, script: F) -> Outcome
where
    F: FnOnce(ApiServer) -> futures::future::BoxFuture<'static, ()>,
{
    let (client, server) = mock_client();
    let ctx = context(client);
    let server = tokio::spawn(script(server));
    let outcome = tokio::time::timeout(WAIT, federation::reconcile_steps(&fed, &ctx))
        .await
        .expect("reconciliation finished in time")
        .expect("reconciliation succeeded");
    drop(ctx);
    tokio::time::timeout(WAIT, server)
        .await
        .expect("scenario finished in time")
        .expect("scenario passed");
    outcome
}

#[tokio::test]
async fn a_new_federation_creates_exactly_the_expected_objects() {
    let nodes = vec![
        mk_node("a", "jetson", "jetson-cnn"),
        mk_node("b", "akida", "akida-cnn"),
    ];
    let outcome = scenario(mk_federation("{kind: ring}"), move |mut server| {
        Box::pin(async move {
            lists(&mut server, json_of(&nodes), vec![], vec![], vec![]).await;
            let service = server
                .expect_apply("/api/v1/namespaces/lab/services/fed-p2p", "Service")
                .await;
            assert_eq!(service["spec"]["ports"][1]["name"], "metrics", "{service}");
            for node in ["a", "b"] {
                let path = format!("{SECRETS}/fed-{node}-identity");
                let secret = server.expect_apply(&path, "Secret").await;
                assert_eq!(secret["immutable"], true);
            }
            for node in ["a", "b"] {
                let path = format!("{CONFIG_MAPS}/fed-{node}-config");
                let cm = server.expect_apply(&path, "ConfigMap").await;
                let text = cm["data"]["config.yaml"].as_str().unwrap();
                assert!(
                    text.contains("fed-a.fed-p2p.lab.svc.cluster.local"),
                    "{text}"
                );
                assert!(text.contains("metricsAddress: 0.0.0.0:9400"), "{text}");
            }
            let rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces/lab";
            for (node, device) in [("a", "nvidia.com/gpu"), ("b", "brainchip.com/akida")] {
                let name = format!("fed-{node}");
                let sa = format!("/api/v1/namespaces/lab/serviceaccounts/{name}");
                server.expect_apply(&sa, "ServiceAccount").await;
                server
                    .expect_apply(&format!("{rbac}/roles/{name}"), "Role")
                    .await;
                server
                    .expect_apply(&format!("{rbac}/rolebindings/{name}"), "RoleBinding")
                    .await;
                let pod = server.expect_apply(&format!("{PODS}/{name}"), "Pod").await;
                let container = &pod["spec"]["containers"][0];
                assert_eq!(container["resources"]["limits"][device], "1", "{pod}");
                assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
                assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
            }
            let status = server.expect(Method::PATCH, STATUS).await;
            status.assert_apply("FederationRound");
            let s = &status.body["status"];
            assert_eq!(s["phase"], "Pending");
            assert_eq!(s["conditions"][0]["type"], "Ready");
            assert_eq!(s["conditions"][0]["status"], "True");
            assert_eq!(s["conditions"][0]["message"], "2 of 2 member pods exist");
            assert_eq!(s["conditions"][1]["type"], "ConfigurationCurrent");
            assert_eq!(s["conditions"][1]["status"], "True");
            status.reply_status();
            let event = server.expect_event().await;
            assert_eq!(event["reason"], "RunStarted");
            assert_eq!(event["type"], "Normal");
            server.expect_no_more().await;
        })
    })
    .await;
    assert_eq!(outcome.pods_created, 2);
    assert!(outcome.problems.is_empty());
}

#[tokio::test]
async fn an_invalid_spec_yields_a_condition_an_event_and_no_pods() {
    let nodes = vec![
        mk_node("a", "jetson", "jetson-cnn"),
        mk_node("b", "akida", "jetson-cnn"),
    ];
    let outcome = scenario(mk_federation("{kind: ring}"), move |mut server| {
        Box::pin(async move {
            lists(&mut server, json_of(&nodes), vec![], vec![], vec![]).await;
            let status = server.expect(Method::PATCH, STATUS).await;
            status.assert_apply("FederationRound");
            let s = &status.body["status"];
            assert_eq!(s["phase"], "Failed");
            let ready = &s["conditions"][0];
            assert_eq!(ready["status"], "False");
            assert_eq!(ready["reason"], "UnsupportedModel");
            assert!(ready["message"].as_str().unwrap().contains("DflNode b"));
            status.reply_status();
            let event = server.expect_event().await;
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "UnsupportedModel");
            server.expect_no_more().await;
        })
    })
    .await;
    assert_eq!(outcome.action, Action::await_change());
    assert_eq!(outcome.pods_created, 0);
    assert_eq!(outcome.problems.len(), 1);
}

#[tokio::test]
async fn status_aggregates_the_members() {
    let mut run = started();
    for (node, round, accuracy) in [(0, 7, 0.5), (1, 6, 0.7)] {
        run.nodes[node].status = Some(DflNodeStatus {
            phase: Some(NodePhase::Training),
            round: Some(round),
            accuracy: Some(accuracy),
            ..DflNodeStatus::default()
        });
    }
    let outcome = scenario(mk_federation("{kind: ring}"), move |mut server| {
        Box::pin(async move {
            let pods = vec![running_pod("a", "Running"), running_pod("b", "Running")];
            lists(
                &mut server,
                json_of(&run.nodes),
                run.config_maps,
                run.secrets,
                pods,
            )
            .await;
            let status = server.expect(Method::PATCH, STATUS).await;
            status.assert_apply("FederationRound");
            let s = &status.body["status"];
            assert_eq!(s["phase"], "Running");
            assert_eq!(s["currentRound"], 6);
            let mean = s["meanAccuracy"].as_f64().unwrap();
            assert!((mean - 0.6).abs() < 1e-9, "{mean}");
            assert_eq!(s["nodes"][0]["phase"], "Training");
            assert_eq!(s["conditions"][1]["reason"], "UpToDate");
            status.reply_status();
            server.expect_no_more().await;
        })
    })
    .await;
    assert_eq!(outcome.pods_created, 0);

    // One member failed while the other trains: the federation is degraded.
    let run = started();
    scenario(mk_federation("{kind: ring}"), move |mut server| {
        Box::pin(async move {
            let pods = vec![running_pod("a", "Failed"), running_pod("b", "Running")];
            lists(
                &mut server,
                json_of(&run.nodes),
                run.config_maps,
                run.secrets,
                pods,
            )
            .await;
            let status = server.expect(Method::PATCH, STATUS).await;
            assert_eq!(status.body["status"]["phase"], "Degraded");
            status.reply_status();
            server.expect_no_more().await;
        })
    })
    .await;
}

#[tokio::test]
async fn a_deleted_pod_is_recreated_and_a_spec_change_is_reported() {
    let run = started();
    // The spec changed after the run started: it needs a new run, but the missing pod
    // still comes back with the configuration its peers expect.
    let mut fed = mk_federation("{kind: ring}");
    fed.spec.rounds = 50;
    scenario(fed, move |mut server| {
        Box::pin(async move {
            let pods = vec![running_pod("a", "Running")];
            lists(
                &mut server,
                json_of(&run.nodes),
                run.config_maps,
                run.secrets,
                pods,
            )
            .await;
            server
                .expect_apply("/api/v1/namespaces/lab/services/fed-p2p", "Service")
                .await;
            server
                .expect_apply(
                    "/api/v1/namespaces/lab/serviceaccounts/fed-b",
                    "ServiceAccount",
                )
                .await;
            let rbac = "/apis/rbac.authorization.k8s.io/v1/namespaces/lab";
            server
                .expect_apply(&format!("{rbac}/roles/fed-b"), "Role")
                .await;
            server
                .expect_apply(&format!("{rbac}/rolebindings/fed-b"), "RoleBinding")
                .await;
            let pod = server.expect_apply(&format!("{PODS}/fed-b"), "Pod").await;
            let volumes = pod["spec"]["volumes"].as_array().unwrap();
            assert!(volumes
                .iter()
                .any(|v| v["configMap"]["name"] == json!("fed-b-config")));
            let status = server.expect(Method::PATCH, STATUS).await;
            let current = &status.body["status"]["conditions"][1];
            assert_eq!(current["type"], "ConfigurationCurrent");
            assert_eq!(current["status"], "False");
            assert_eq!(current["reason"], "NewRunRequired");
            assert!(current["message"].as_str().unwrap().contains("spec.rounds"));
            status.reply_status();
            let event = server.expect_event().await;
            assert_eq!(event["reason"], "PodsRecreated");
            server.expect_no_more().await;
        })
    })
    .await;
}

#[tokio::test]
async fn transient_errors_fail_the_pass_and_are_retried_with_growing_delays() {
    let (client, mut server) = mock_client();
    let ctx = context(client);
    let fed = Arc::new(mk_federation("{kind: ring}"));
    let script = tokio::spawn(async move {
        let r = server.expect(Method::GET, NODES).await;
        r.reply_error(503);
        server
    });
    let result = tokio::time::timeout(WAIT, federation::reconcile(fed.clone(), ctx.clone()))
        .await
        .expect("in time");
    let error = result.expect_err("a 503 fails the reconciliation");
    assert_eq!(error.category(), "server_error");
    let first = federation::error_policy(fed.clone(), &error, ctx.clone());
    let second = federation::error_policy(fed.clone(), &error, ctx.clone());
    assert_eq!(first, Action::requeue(std::time::Duration::from_secs(2)));
    assert_eq!(second, Action::requeue(std::time::Duration::from_secs(4)));
    let metrics = ctx.metrics.render().unwrap();
    assert!(metrics.contains("reason=\"server_error\"} 1"), "{metrics}");
    drop(ctx);
    script.await.unwrap().expect_no_more().await;
}
