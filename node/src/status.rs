//! Reports a node's progress into its `DflNode` status on a cluster, so that
//! `kubectl get dflnodes` and the operator's `FederationRound` status see each node's
//! round, loss, accuracy and peers.
//!
//! Training never waits for the API server: progress goes into a watch channel (the newest
//! value replaces an unsent one) and a background task writes it with server-side apply
//! under its own field manager, at most once per interval and with a timeout on every
//! request. A failed write is logged and retried with the next change; the final status
//! (succeeded or failed) is flushed when the node stops.

use std::time::Duration;

use edgesync_api::{DflNode, DflNodeStatus, NodePhase};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::federation::report::NodeEvent;

/// Field manager of the node's status writes; the operator writes the phase of pods that
/// never started under its own.
pub const FIELD_MANAGER: &str = "edgesync-node";

/// How a reporter paces and bounds its writes.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Shortest time between two writes: rounds can be faster than the API server needs
    /// to hear about them.
    pub min_interval: Duration,
    /// Longest one write may take.
    pub request_timeout: Duration,
}

impl Default for Pacing {
    fn default() -> Pacing {
        Pacing {
            min_interval: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no Kubernetes credentials (in-cluster service account or kubeconfig): {0}")]
    Credentials(#[source] kube::Error),
    #[error("connecting to the Kubernetes API timed out after {0:?}")]
    Timeout(Duration),
}

/// Writes one node's status in the background; see the module notes.
pub struct StatusReporter {
    status: watch::Sender<DflNodeStatus>,
    task: JoinHandle<()>,
    pacing: Pacing,
}

impl StatusReporter {
    /// Connects with the pod's service account (or the kubeconfig outside a cluster).
    pub async fn connect(
        namespace: &str,
        name: &str,
        pacing: Pacing,
    ) -> Result<StatusReporter, StatusError> {
        let client = tokio::time::timeout(pacing.request_timeout, Client::try_default())
            .await
            .map_err(|_| StatusError::Timeout(pacing.request_timeout))?
            .map_err(StatusError::Credentials)?;
        Ok(StatusReporter::start(client, namespace, name, pacing))
    }

    /// Starts the writer task for `name` in `namespace`; the node is `Pending` until its
    /// first round starts.
    pub fn start(client: Client, namespace: &str, name: &str, pacing: Pacing) -> StatusReporter {
        let initial = DflNodeStatus {
            phase: Some(NodePhase::Pending),
            ..DflNodeStatus::default()
        };
        let (status, changes) = watch::channel(initial);
        let api: Api<DflNode> = Api::namespaced(client, namespace);
        let task = tokio::spawn(write_changes(api, name.to_string(), changes, pacing));
        StatusReporter {
            status,
            task,
            pacing,
        }
    }

    /// Folds one progress event into the status.
    pub fn observe(&self, event: &NodeEvent) {
        self.status
            .send_if_modified(|status| apply_event(status, event));
    }

    /// Records how the node ended, if it did (`None` leaves the phase as it is), and waits,
    /// within bounds, for the last status to be written.
    pub async fn finish(self, end: Option<(NodePhase, Option<String>)>) {
        if let Some((phase, message)) = end {
            self.status.send_modify(|status| {
                status.phase = Some(phase);
                status.message = message;
            });
        }
        drop(self.status);

        let limit = self.pacing.min_interval + self.pacing.request_timeout;
        if tokio::time::timeout(limit, self.task).await.is_err() {
            tracing::warn!(?limit, "the final node status was not written in time");
        }
    }
}

/// The status after `event`; returns whether anything changed.
fn apply_event(status: &mut DflNodeStatus, event: &NodeEvent) -> bool {
    let before = status.clone();
    match event {
        NodeEvent::Started { round, .. } => {
            status.phase = Some(NodePhase::Training);
            status.round = Some(*round);
        }
        NodeEvent::Round(record) => {
            status.phase = Some(NodePhase::Training);
            status.round = Some(record.round);
            status.loss = Some(record.train_loss);
            if let Some(accuracy) = record.test_accuracy {
                status.accuracy = Some(accuracy);
            }
            status.connected_peers = Some(record.peers_connected as u32);
        }
        NodeEvent::PeerConnected { .. } => {
            status.connected_peers = Some(status.connected_peers.unwrap_or(0) + 1);
        }
        NodeEvent::PeerDisconnected { .. } => {
            status.connected_peers = Some(status.connected_peers.unwrap_or(1).saturating_sub(1));
        }
        // Whether the node finished or was stopped, `finish` says.
        NodeEvent::Finished { .. } | NodeEvent::Exited { .. } => {}
    }
    *status != before
}

/// The writer task: one write per change, paced, until the reporter is dropped and the
/// last value is written.
async fn write_changes(
    api: Api<DflNode>,
    name: String,
    mut changes: watch::Receiver<DflNodeStatus>,
    pacing: Pacing,
) {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut written: Option<DflNodeStatus> = None;
    loop {
        // Closed means the node stopped; the value it left is still written once.
        let closed = changes.changed().await.is_err();
        let status = changes.borrow_and_update().clone();

        if written.as_ref() != Some(&status) {
            let body = serde_json::json!({
                "apiVersion": DflNode::api_version(&()),
                "kind": DflNode::kind(&()),
                "status": status,
            });
            let patch = Patch::Apply(&body);
            let request = api.patch_status(&name, &params, &patch);
            match tokio::time::timeout(pacing.request_timeout, request).await {
                Ok(Ok(_)) => {
                    tracing::debug!(node = %name, round = ?status.round, "status written");
                    written = Some(status);
                }
                Ok(Err(error)) => {
                    tracing::warn!(node = %name, %error, "writing the node status failed");
                }
                Err(_) => {
                    tracing::warn!(node = %name, timeout = ?pacing.request_timeout,
                        "writing the node status timed out");
                }
            }
        }
        if closed {
            return;
        }
        tokio::time::sleep(pacing.min_interval).await;
    }
}

#[cfg(test)]
mod tests {
    //! The Kubernetes API server is the one part faked here: a loopback HTTP server that
    //! records what the reporter sends and answers as the API server would.

    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::federation::report::RoundRecord;

    #[derive(Debug, Clone)]
    struct Recorded {
        method: String,
        path_and_query: String,
        content_type: String,
        body: serde_json::Value,
    }

    /// A DflNode as the API server returns it after a status write.
    const STORED: &str = r#"{"apiVersion": "edgesync.dev/v1alpha1", "kind": "DflNode",
        "metadata": {"name": "node-a", "namespace": "edge"},
        "spec": {"hardware": "cpu", "model": "akida-cnn",
                 "dataset": {"format": "mnist", "path": "/data/mnist"}}}"#;

    /// Serves until the test ends; `answer` false makes every request hang.
    async fn fake_api(answer: bool) -> (Client, Arc<Mutex<Vec<Recorded>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let log = recorded.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let log = log.clone();
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let method = request.method().to_string();
                        let path_and_query = request.uri().to_string();
                        let content_type = request
                            .headers()
                            .get("content-type")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let bytes = request.into_body().collect().await?.to_bytes();
                        // Apply patches arrive as YAML, of which JSON is a subset.
                        let body = serde_yaml::from_slice(&bytes).unwrap();
                        log.lock().unwrap().push(Recorded {
                            method,
                            path_and_query,
                            content_type,
                            body,
                        });
                        if !answer {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(STORED))))
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        let config = kube::Config::new(url.parse().unwrap());
        (Client::try_from(config).unwrap(), recorded)
    }

    fn pacing() -> Pacing {
        Pacing {
            min_interval: Duration::from_millis(20),
            request_timeout: Duration::from_millis(500),
        }
    }

    fn round(round: u64, accuracy: Option<f64>) -> NodeEvent {
        NodeEvent::Round(RoundRecord {
            node: "node-a".into(),
            round,
            train_loss: 1.0 / round as f64,
            test_accuracy: accuracy,
            peers_connected: 2,
            ..RoundRecord::default()
        })
    }

    #[tokio::test]
    async fn progress_and_the_end_reach_the_status_subresource() {
        let (client, recorded) = fake_api(true).await;
        let reporter = StatusReporter::start(client, "edge", "node-a", pacing());
        reporter.observe(&round(1, None));
        tokio::time::sleep(Duration::from_millis(100)).await;
        reporter.observe(&round(2, Some(0.625)));
        reporter.observe(&round(3, None));
        reporter.finish(Some((NodePhase::Succeeded, None))).await;

        let recorded = recorded.lock().unwrap().clone();
        assert!(recorded.len() >= 2, "{recorded:?}");
        for request in &recorded {
            assert_eq!(request.method, "PATCH");
            assert_eq!(
                request.path_and_query,
                "/apis/edgesync.dev/v1alpha1/namespaces/edge/dflnodes/node-a/status\
                 ?&force=true&fieldManager=edgesync-node"
            );
            assert_eq!(request.content_type, "application/apply-patch+yaml");
            assert_eq!(request.body["kind"], "DflNode");
        }
        let first = &recorded[0].body["status"];
        assert_eq!(first["phase"], "Training");
        assert_eq!(first["round"], 1);

        // The last write holds the newest round, the last accuracy seen and the end.
        let last = &recorded.last().unwrap().body["status"];
        assert_eq!(last["phase"], "Succeeded");
        assert_eq!(last["round"], 3);
        assert_eq!(last["accuracy"], 0.625);
        assert!((last["loss"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(last["connectedPeers"], 2);
    }

    #[tokio::test]
    async fn a_failure_is_reported_with_its_message() {
        let (client, recorded) = fake_api(true).await;
        let reporter = StatusReporter::start(client, "edge", "node-a", pacing());
        reporter.observe(&round(4, Some(0.5)));
        let message = "reading /data/mnist: no such file".to_string();
        reporter
            .finish(Some((NodePhase::Failed, Some(message.clone()))))
            .await;

        let recorded = recorded.lock().unwrap().clone();
        let last = &recorded.last().unwrap().body["status"];
        assert_eq!(last["phase"], "Failed");
        assert_eq!(last["message"], message.as_str());
        assert_eq!(last["round"], 4);
    }

    #[tokio::test]
    async fn a_hanging_api_server_never_holds_up_the_node() {
        let (client, recorded) = fake_api(false).await;
        let reporter = StatusReporter::start(client, "edge", "node-a", pacing());
        let started = tokio::time::Instant::now();
        for r in 1..=50 {
            reporter.observe(&round(r, None));
        }
        // Observing never waits for the API server.
        assert!(started.elapsed() < Duration::from_millis(100));
        reporter.finish(Some((NodePhase::Succeeded, None))).await;
        let bound = pacing().min_interval + pacing().request_timeout;
        assert!(started.elapsed() < bound + Duration::from_millis(300));
        assert!(!recorded.lock().unwrap().is_empty());
    }

    #[test]
    fn peers_are_counted_between_rounds_and_a_stop_keeps_the_phase() {
        let mut status = DflNodeStatus::default();
        let peer = |connected: bool| {
            let (node, peer, round) = ("a".to_string(), "b".to_string(), 1);
            if connected {
                NodeEvent::PeerConnected { node, peer, round }
            } else {
                NodeEvent::PeerDisconnected { node, peer, round }
            }
        };
        assert!(apply_event(&mut status, &peer(true)));
        assert!(apply_event(&mut status, &peer(true)));
        assert!(apply_event(&mut status, &peer(false)));
        assert_eq!(status.connected_peers, Some(1));

        let finished = NodeEvent::Finished {
            node: "a".into(),
            round: 7,
        };
        assert!(!apply_event(&mut status, &finished));
        assert_eq!(status.phase, None);
    }
}
