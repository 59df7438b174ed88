//! Builders of a run's objects other than pods: the headless Service (peer and metrics
//! ports), each member's ConfigMap and identity Secret, and the ServiceAccount, Role and
//! RoleBinding that let the member's pod report into its own `DflNode` status and nothing
//! else. All pure.

use std::collections::BTreeMap;

use edgesync_api::FederationRound;
use k8s_openapi::api::core::v1::{
    ConfigMap, Secret, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};

use crate::federation::pod::{METRICS_PORT, METRICS_PORT_NAME};
use crate::identity::Identity;
use crate::names::{self, ANNOTATION_DATA_CLAIM, ANNOTATION_PEER_ID, CONFIG_KEY, IDENTITY_KEY};
use crate::node_config::NodeConfig;

/// Why an object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("FederationRound has no metadata.uid yet; owner references need one")]
    MissingUid,
    #[error("FederationRound has no namespace")]
    MissingNamespace,
    #[error("writing the configuration of node {node}: {source}")]
    Yaml {
        node: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(transparent)]
    MissingIdentity(#[from] crate::node_config::MissingIdentity),
}

/// The owner reference every object of a run carries, so deleting the `FederationRound`
/// deletes them through the garbage collector, without a finalizer.
pub fn owner_reference(fed: &FederationRound) -> Result<OwnerReference, BuildError> {
    fed.controller_owner_ref(&()).ok_or(BuildError::MissingUid)
}

fn meta(
    name: String,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Headless Service: gives every member pod the DNS name its peers dial.
pub fn service(fed: &FederationRound, namespace: &str, owner: &OwnerReference) -> Service {
    let fed_name = fed.name_any();
    let mut selector = BTreeMap::new();
    selector.insert(names::LABEL_FEDERATION.to_string(), fed_name.clone());
    selector.insert(names::LABEL_COMPONENT.to_string(), "dfl-node".to_string());
    Service {
        metadata: meta(
            names::service_name(&fed_name),
            namespace,
            names::federation_labels(&fed_name),
            owner,
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector),
            // Members dial each other while starting, before any readiness: their DNS
            // records must exist as soon as the pods have addresses.
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                ServicePort {
                    name: Some("p2p".into()),
                    port: names::P2P_PORT,
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
                // Lets a ServiceMonitor, or anyone resolving the pods' DNS names, reach
                // each member's metrics.
                ServicePort {
                    name: Some(METRICS_PORT_NAME.into()),
                    port: METRICS_PORT,
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The member's configuration. `data_claim` is kept beside it because the pod of a running
/// member is rebuilt from this ConfigMap alone.
pub fn config_map(
    namespace: &str,
    config: &NodeConfig,
    data_claim: Option<&str>,
    owner: &OwnerReference,
) -> Result<ConfigMap, BuildError> {
    let text = config.to_yaml().map_err(|source| BuildError::Yaml {
        node: config.name.clone(),
        source,
    })?;
    let mut metadata = meta(
        names::config_map_name(&config.federation, &config.name),
        namespace,
        names::member_labels(&config.federation, &config.name),
        owner,
    );
    if let Some(claim) = data_claim {
        metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_DATA_CLAIM.to_string(),
            claim.to_string(),
        )]));
    }
    Ok(ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), text)])),
        ..ConfigMap::default()
    })
}

/// The member's identity key.
pub fn identity_secret(
    fed: &str,
    node: &str,
    namespace: &str,
    identity: &Identity,
    owner: &OwnerReference,
) -> Secret {
    let mut metadata = meta(
        names::identity_secret_name(fed, node),
        namespace,
        names::member_labels(fed, node),
        owner,
    );
    metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_PEER_ID.to_string(),
        identity.peer_id.clone(),
    )]));
    Secret {
        metadata,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            IDENTITY_KEY.to_string(),
            ByteString(identity.key.clone()),
        )])),
        // The key must never change under a running federation.
        immutable: Some(true),
        ..Secret::default()
    }
}

/// ServiceAccount, Role and RoleBinding of one member: `get` and `patch` on the status of
/// its own `DflNode` only.
pub fn rbac(
    fed: &str,
    node: &str,
    namespace: &str,
    owner: &OwnerReference,
) -> (ServiceAccount, Role, RoleBinding) {
    let name = names::member_name(fed, node);
    let labels = names::member_labels(fed, node);
    let account = ServiceAccount {
        metadata: meta(name.clone(), namespace, labels.clone(), owner),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(name.clone(), namespace, labels.clone(), owner),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![edgesync_api::GROUP.to_string()]),
            resources: Some(vec!["dflnodes/status".into()]),
            resource_names: Some(vec![node.to_string()]),
            verbs: vec!["get".into(), "patch".into()],
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: meta(name.clone(), namespace, labels, owner),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(namespace.to_string()),
            ..Subject::default()
        }]),
    };
    (account, role, binding)
}
