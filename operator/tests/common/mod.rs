//! Fixtures shared by the operator's tests: resources built from YAML the way a user writes
//! them, and a mock API server that checks every request of a scenario.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use edgesync_api::{DflNode, FederationRound};
use edgesync_operator::federation::objects;
use edgesync_operator::identity::Identity;
use edgesync_operator::node_config;
use edgesync_operator::validate;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

pub const NS: &str = "lab";
pub const FED: &str = "fed";
pub const FED_UID: &str = "0f9b8c2e-5a41-4f7e-9c1d-2b3a4c5d6e7f";
/// How long a scenario waits for a request before it fails, instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// A `FederationRound` named `fed` in namespace `lab`, selecting `federation: fed`, laid
/// out by `topology` (a YAML flow mapping).
pub fn mk_federation(topology: &str) -> FederationRound {
    let text = format!(
        r#"
apiVersion: edgesync.dev/v1alpha1
kind: FederationRound
metadata: {{name: {FED}, namespace: {NS}, uid: {FED_UID}, generation: 1}}
spec:
  rounds: 10
  localSteps: 5
  batchSize: 32
  optimizer: {{kind: adam, learningRate: 0.001}}
  topology: {topology}
  partition: {{kind: iid}}
  nodeSelector: {{matchLabels: {{federation: {FED}}}}}
"#
    );
    serde_yaml::from_str(&text).expect("federation fixture")
}

/// A `DflNode` selected by `mk_federation`.
pub fn mk_node(name: &str, hardware: &str, model: &str) -> DflNode {
    let text = format!(
        r#"
apiVersion: edgesync.dev/v1alpha1
kind: DflNode
metadata: {{name: {name}, namespace: {NS}, labels: {{federation: {FED}}}}}
spec:
  hardware: {hardware}
  model: {model}
  dataset: {{format: cifar10-bin, path: /srv/data/cifar10}}
  placement: {{nodeName: host-{name}}}
  resources: {{cpu: "2", memory: 2Gi}}
"#
    );
    serde_yaml::from_str(&text).expect("node fixture")
}

/// Paths the reconcilers call in namespace `lab`.
pub const NODES: &str = "/apis/edgesync.dev/v1alpha1/namespaces/lab/dflnodes";
pub const CONFIG_MAPS: &str = "/api/v1/namespaces/lab/configmaps";
pub const SECRETS: &str = "/api/v1/namespaces/lab/secrets";
pub const PODS: &str = "/api/v1/namespaces/lab/pods";
pub const STATUS: &str = "/apis/edgesync.dev/v1alpha1/namespaces/lab/federationrounds/fed/status";

/// Objects as the API server would send them.
pub fn json_of<T: serde::Serialize>(objects: &[T]) -> Vec<Value> {
    objects
        .iter()
        .map(|o| serde_json::to_value(o).unwrap())
        .collect()
}

/// The four lists every reconciliation starts with.
pub async fn lists(
    server: &mut ApiServer,
    nodes: Vec<Value>,
    config_maps: Vec<Value>,
    secrets: Vec<Value>,
    pods: Vec<Value>,
) {
    let query = server.expect_list(NODES, "DflNode", nodes).await;
    assert!(query.contains("labelSelector=federation%3Dfed"), "{query}");
    let owned = "labelSelector=edgesync.dev%2Ffederation-round%3Dfed";
    for (path, kind, items) in [
        (CONFIG_MAPS, "ConfigMap", config_maps),
        (SECRETS, "Secret", secrets),
        (PODS, "Pod", pods),
    ] {
        let query = server.expect_list(path, kind, items).await;
        assert!(query.contains(owned), "{path}: {query}");
    }
}

/// The objects of a run already started for nodes `a` and `b`.
pub struct Started {
    pub nodes: Vec<DflNode>,
    pub config_maps: Vec<Value>,
    pub secrets: Vec<Value>,
}

pub fn started() -> Started {
    let fed = mk_federation("{kind: ring}");
    let owner = objects::owner_reference(&fed).unwrap();
    let nodes = vec![
        mk_node("a", "jetson", "jetson-cnn"),
        mk_node("b", "jetson", "jetson-cnn"),
    ];
    let plan = validate::federation(&fed, &nodes).unwrap();
    let ids: BTreeMap<String, Identity> = [("a", 1u8), ("b", 2)]
        .into_iter()
        .map(|(n, s)| (n.to_string(), Identity::from_seed([s; 32]).unwrap()))
        .collect();
    let configs = node_config::build(&fed, NS, &plan, &ids, "cluster.local").unwrap();
    let config_maps = configs
        .iter()
        .map(|c| objects::config_map(NS, c, None, &owner).unwrap())
        .collect::<Vec<_>>();
    let secrets = ids
        .iter()
        .map(|(n, id)| objects::identity_secret(FED, n, NS, id, &owner))
        .collect::<Vec<_>>();
    Started {
        nodes,
        config_maps: json_of(&config_maps),
        secrets: json_of(&secrets),
    }
}

/// A member pod of the run in `phase`.
pub fn running_pod(node: &str, phase: &str) -> Value {
    let fed = mk_federation("{kind: ring}");
    let owner = objects::owner_reference(&fed).unwrap();
    let mut pod = Pod {
        metadata: kube::core::ObjectMeta {
            name: Some(format!("{FED}-{node}")),
            namespace: Some(NS.into()),
            labels: Some(edgesync_operator::names::member_labels(FED, node)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        ..Pod::default()
    };
    pod.status = Some(PodStatus {
        phase: Some(phase.into()),
        ..PodStatus::default()
    });
    serde_json::to_value(pod).unwrap()
}

/// The client side of a mock API server, and the server side to script.
pub fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle })
}

pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request as the server received it, waiting for its response.
pub struct Received {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// Waits for the next request and checks its method and path (query excluded).
    pub async fn expect(&mut self, method: Method, path: &str) -> Received {
        let next = tokio::time::timeout(WAIT, self.handle.next_request()).await;
        let (request, send) = next
            .unwrap_or_else(|_| panic!("no request arrived; expected {method} {path}"))
            .unwrap_or_else(|| panic!("the client went away; expected {method} {path}"));
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.expect("request body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        let received = Received {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            body,
            send,
        };
        assert_eq!(
            (&received.method, received.path.as_str()),
            (&method, path),
            "unexpected request (query {:?})",
            received.query
        );
        received
    }

    /// Expects a list and answers it with `items`; returns the request's query.
    pub async fn expect_list(&mut self, path: &str, kind: &str, items: Vec<Value>) -> String {
        let r = self.expect(Method::GET, path).await;
        let query = r.query.clone();
        r.reply_list(kind, items);
        query
    }

    /// Expects a server-side apply of `kind` under the operator's field manager, and
    /// answers with the applied object. Returns the applied body.
    pub async fn expect_apply(&mut self, path: &str, kind: &str) -> Value {
        let r = self.expect(Method::PATCH, path).await;
        r.assert_apply(kind);
        let body = r.body.clone();
        r.reply_applied();
        body
    }

    /// Expects an event to be created and returns it.
    pub async fn expect_event(&mut self) -> Value {
        let path = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
        let r = self.expect(Method::POST, &path).await;
        let body = r.body.clone();
        r.reply(StatusCode::CREATED, body.clone());
        body
    }

    /// Asserts that the client makes no further request: it must have been dropped.
    pub async fn expect_no_more(mut self) {
        match tokio::time::timeout(WAIT, self.handle.next_request()).await {
            Ok(None) => {}
            Ok(Some((request, _))) => {
                panic!("unexpected request {} {}", request.method(), request.uri())
            }
            Err(_) => panic!("the client was not dropped"),
        }
    }
}

impl Received {
    pub fn reply(self, status: StatusCode, body: Value) {
        let bytes = serde_json::to_vec(&body).expect("response body");
        let response = Response::builder()
            .status(status)
            .body(Body::from(bytes))
            .expect("response");
        self.send.send_response(response);
    }

    /// Answers an apply with the applied object, as the server would return it.
    pub fn reply_applied(self) {
        let body = self.body.clone();
        self.reply(StatusCode::OK, body);
    }

    /// Answers a status apply with the federation carrying the applied status.
    pub fn reply_status(self) {
        let mut fed = serde_json::to_value(mk_federation("{kind: ring}")).expect("fixture");
        fed["status"] = self.body["status"].clone();
        self.reply(StatusCode::OK, fed);
    }

    pub fn reply_list(self, kind: &str, items: Vec<Value>) {
        let body = json!({
            "apiVersion": "v1",
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "1"},
            "items": items,
        });
        self.reply(StatusCode::OK, body);
    }

    pub fn reply_error(self, code: u16) {
        let status = StatusCode::from_u16(code).expect("status code");
        self.reply(
            status,
            json!({
                "apiVersion": "v1", "kind": "Status", "status": "Failure",
                "message": "injected failure", "reason": "InternalError", "code": code,
            }),
        );
    }

    pub fn assert_apply(&self, kind: &str) {
        assert!(
            self.query.contains("fieldManager=edgesync-operator"),
            "{} {}: query {:?} lacks the field manager",
            self.method,
            self.path,
            self.query
        );
        assert!(
            self.query.contains("force=true"),
            "{}: {:?}",
            self.path,
            self.query
        );
        assert_eq!(self.body["kind"], kind, "{}: body {}", self.path, self.body);
    }
}
