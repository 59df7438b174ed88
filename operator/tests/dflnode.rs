//! The `DflNode` reconciler against a mock API server.

mod common;

use std::sync::Arc;

use common::{mk_node, mock_client, WAIT};
use edgesync_operator::context::Context;
use edgesync_operator::dflnode;
use edgesync_operator::metrics::Metrics;
use edgesync_operator::settings::NodePodSettings;
use http::Method;
use serde_json::json;

const PODS: &str = "/api/v1/namespaces/lab/pods";

#[tokio::test]
async fn a_pod_that_cannot_start_marks_its_node_and_a_bad_spec_is_announced_once() {
    let (client, mut server) = mock_client();
    let ctx = Arc::new(Context::new(
        client,
        NodePodSettings::default(),
        Arc::new(Metrics::new().unwrap()),
        None,
    ));
    let node = mk_node("b", "akida", "jetson-cnn");
    let script = tokio::spawn(async move {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "fed-b", "namespace": "lab",
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "dfl-node", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImagePull"}}}]}
        });
        for pass in 0..2 {
            let r = server.expect(Method::GET, PODS).await;
            assert!(
                r.query.contains("edgesync.dev%2Fdfl-node%3Db"),
                "{}",
                r.query
            );
            r.reply_list("Pod", vec![pod.clone()]);
            let status = "/apis/edgesync.dev/v1alpha1/namespaces/lab/dflnodes/b/status";
            let r = server.expect(Method::PATCH, status).await;
            r.assert_apply("DflNode");
            assert_eq!(r.body["status"], json!({"phase": "Failed"}));
            let mut node = serde_json::to_value(mk_node("b", "akida", "jetson-cnn")).unwrap();
            node["status"] = r.body["status"].clone();
            r.reply(http::StatusCode::OK, node);
            if pass == 0 {
                let event = server.expect_event().await;
                assert_eq!(event["reason"], "UnsupportedModel");
                assert_eq!(event["regarding"]["kind"], "DflNode");
            }
        }
        server.expect_no_more().await;
    });
    for _ in 0..2 {
        let problems = tokio::time::timeout(WAIT, dflnode::reconcile_steps(&node, &ctx))
            .await
            .expect("in time")
            .expect("reconciled");
        assert_eq!(problems.len(), 1);
    }
    drop(ctx);
    tokio::time::timeout(WAIT, script)
        .await
        .expect("scenario in time")
        .expect("scenario passed");
}
