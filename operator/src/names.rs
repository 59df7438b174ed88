//! Names, labels and paths shared by the builders, the controllers and the tests, so that an
//! object built in one place is found by the same name and labels in another.

use std::collections::BTreeMap;

/// Field manager of every server-side apply the operator makes.
pub const MANAGER: &str = "edgesync-operator";

/// Label carrying the `FederationRound` an object belongs to.
pub const LABEL_FEDERATION: &str = "edgesync.dev/federation-round";
/// Label carrying the `DflNode` an object serves.
pub const LABEL_NODE: &str = "edgesync.dev/dfl-node";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";

/// Annotation on a `DflNode` whose dataset is an image folder: its number of classes. The
/// operator cannot read the host's folder, and every member must know every other member's
/// classifier shape from its configuration alone.
pub const ANNOTATION_CLASSES: &str = "edgesync.dev/classes";
/// Annotation on a `DflNode`: read its data from this PersistentVolumeClaim instead of the
/// host path; `spec.dataset.path` is then where the claim is mounted.
pub const ANNOTATION_DATA_CLAIM: &str = "edgesync.dev/dataset-claim";
/// Annotation on an identity Secret: the peer id its key gives, for people reading it.
pub const ANNOTATION_PEER_ID: &str = "edgesync.dev/peer-id";

/// TCP port nodes listen on for libp2p.
pub const P2P_PORT: i32 = 7400;
/// Where the node's configuration is mounted, and the file in it.
pub const CONFIG_DIR: &str = "/etc/edgesync";
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the node's identity Secret is mounted, and the key file in it.
pub const IDENTITY_DIR: &str = "/var/run/edgesync/identity";
pub const IDENTITY_KEY: &str = "identity.key";
/// Where the node writes checkpoints.
pub const STATE_DIR: &str = "/var/lib/edgesync/state";

/// A Kubernetes object name may be this long when it is also a DNS label (pod host names,
/// Service names).
const MAX_LABEL_LEN: usize = 63;

/// Headless Service giving each member pod a stable DNS name.
pub fn service_name(federation: &str) -> String {
    format!("{federation}-p2p")
}

/// Pod, ServiceAccount, Role and RoleBinding of one member; also the pod's host name.
pub fn member_name(federation: &str, node: &str) -> String {
    format!("{federation}-{node}")
}

pub fn config_map_name(federation: &str, node: &str) -> String {
    format!("{federation}-{node}-config")
}

pub fn identity_secret_name(federation: &str, node: &str) -> String {
    format!("{federation}-{node}-identity")
}

/// The member's address as its peers dial it: the pod's DNS name under the headless
/// Service, which stays the same when the pod is recreated.
pub fn member_address(
    federation: &str,
    node: &str,
    namespace: &str,
    cluster_domain: &str,
) -> String {
    format!(
        "/dns4/{}.{}.{namespace}.svc.{cluster_domain}/tcp/{P2P_PORT}",
        member_name(federation, node),
        service_name(federation),
    )
}

/// Labels selecting every object of one federation.
pub fn federation_labels(federation: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_FEDERATION.to_string(), federation.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_NAME.to_string(), "edgesync".to_string()),
    ])
}

/// Labels of one member's objects.
pub fn member_labels(federation: &str, node: &str) -> BTreeMap<String, String> {
    let mut labels = federation_labels(federation);
    labels.insert(LABEL_NODE.to_string(), node.to_string());
    labels.insert(LABEL_COMPONENT.to_string(), "dfl-node".to_string());
    labels
}

/// Label selector text (`k=v,k=v`) matching `labels`.
pub fn selector_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why `name` cannot be a DNS label (RFC 1123: lower-case letters, digits and `-`, starting
/// and ending with a letter or digit, at most 63 characters), if it cannot.
pub fn dns_label_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > MAX_LABEL_LEN {
        return Some(format!(
            "is {} characters long; at most {MAX_LABEL_LEN} are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!("contains {c:?}; only a-z, 0-9 and '-' are allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("starts or ends with '-'".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_use_the_headless_service() {
        assert_eq!(
            member_address("fed", "a", "lab", "cluster.local"),
            "/dns4/fed-a.fed-p2p.lab.svc.cluster.local/tcp/7400"
        );
    }

    #[test]
    fn dns_labels_are_checked() {
        assert_eq!(dns_label_problem("fed-node-1"), None);
        assert!(dns_label_problem("Fed").is_some());
        assert!(dns_label_problem("a.b").is_some());
        assert!(dns_label_problem("-a").is_some());
        assert!(dns_label_problem(&"x".repeat(64)).is_some());
        assert!(dns_label_problem("").is_some());
    }
}
