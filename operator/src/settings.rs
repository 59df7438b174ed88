//! What the operator is told at start-up: where to serve metrics, how to elect a leader and
//! how node pods are built. Every flag has a long name, an environment variable and a
//! default.

use std::net::SocketAddr;

use clap::{Args, ValueEnum};

pub const DEFAULT_JETSON_IMAGE: &str = "edgesync/dfl-node:0.1.0-jetson";
pub const DEFAULT_AKIDA_IMAGE: &str = "edgesync/dfl-node:0.1.0-akida";
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";
pub const DEFAULT_AKIDA_RESOURCE: &str = "brainchip.com/akida";
pub const DEFAULT_STATE_HOST_ROOT: &str = "/var/lib/edgesync";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// The user the node images create; pods run as it.
pub const DEFAULT_NODE_UID: i64 = 10001;

/// `edgesync-operator run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the HTTP server for /metrics and /healthz.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_addr: SocketAddr,

    /// Watch only this namespace [default: every namespace].
    #[arg(long, env = "EDGESYNC_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,

    #[command(flatten)]
    pub leader: LeaderArgs,

    #[command(flatten)]
    pub pods: NodePodSettings,
}

/// Leader election through a coordination.k8s.io Lease.
#[derive(Debug, Clone, Args)]
pub struct LeaderArgs {
    /// Elect a leader so that only one replica reconciles at a time.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_LEADER_ELECTION",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub leader_election: bool,

    /// Name of the Lease the replicas compete for.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_LEASE_NAME",
        default_value = "edgesync-operator"
    )]
    pub lease_name: String,

    /// Namespace of the Lease; the operator's own namespace in the chart.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_LEASE_NAMESPACE",
        default_value = "default"
    )]
    pub lease_namespace: String,

    /// This replica's name in the Lease [default: the host name].
    #[arg(long, env = "EDGESYNC_OPERATOR_IDENTITY")]
    pub identity: Option<String>,

    /// Seconds a Lease stays valid without renewal; a standby takes over after that.
    #[arg(long, env = "EDGESYNC_OPERATOR_LEASE_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(3..=3600))]
    pub lease_seconds: u32,
}

/// Where a node keeps its checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateVolume {
    /// A pod-local emptyDir: survives container restarts, not a deleted or evicted pod.
    EmptyDir,
    /// A folder on the host under `--state-host-root`: survives pod deletion, so a
    /// recreated pod resumes from its checkpoint. The folder must be writable by the node
    /// user (`--node-uid`), since a hostPath is not re-owned by Kubernetes.
    HostPath,
}

/// Image pull policy of node containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// How node pods are built.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct NodePodSettings {
    /// Node image for Jetson hosts (L4T, CUDA libtorch).
    #[arg(long, env = "EDGESYNC_OPERATOR_JETSON_IMAGE", default_value = DEFAULT_JETSON_IMAGE)]
    pub jetson_image: String,

    /// Node image for Akida hosts.
    #[arg(long, env = "EDGESYNC_OPERATOR_AKIDA_IMAGE", default_value = DEFAULT_AKIDA_IMAGE)]
    pub akida_image: String,

    /// Node image for plain CPU hosts; the Akida image is a CPU build and serves arm64 hosts.
    #[arg(long, env = "EDGESYNC_OPERATOR_CPU_IMAGE", default_value = DEFAULT_AKIDA_IMAGE)]
    pub cpu_image: String,

    /// Pull policy of node containers.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_IMAGE_PULL_POLICY",
        value_enum,
        default_value = "if-not-present"
    )]
    pub image_pull_policy: PullPolicy,

    /// Extended resource a Jetson pod requests (NVIDIA device plugin).
    #[arg(long, env = "EDGESYNC_OPERATOR_GPU_RESOURCE", default_value = DEFAULT_GPU_RESOURCE)]
    pub gpu_resource: String,

    /// Extended resource an Akida pod requests (the Akida PCIe device plugin).
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_AKIDA_RESOURCE",
        default_value = DEFAULT_AKIDA_RESOURCE
    )]
    pub akida_resource: String,

    /// Volume for node checkpoints.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_STATE_VOLUME",
        value_enum,
        default_value = "empty-dir"
    )]
    pub state_volume: StateVolume,

    /// Host folder under which `host-path` state lives, one subfolder per namespace,
    /// federation and node.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_STATE_HOST_ROOT",
        default_value = DEFAULT_STATE_HOST_ROOT
    )]
    pub state_host_root: String,

    /// DNS domain of the cluster, used in member addresses.
    #[arg(
        long,
        env = "EDGESYNC_OPERATOR_CLUSTER_DOMAIN",
        default_value = DEFAULT_CLUSTER_DOMAIN
    )]
    pub cluster_domain: String,

    /// User and group id node containers run as; must match the user of the node images.
    #[arg(long, env = "EDGESYNC_OPERATOR_NODE_UID", default_value_t = DEFAULT_NODE_UID,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub node_uid: i64,
}

impl Default for NodePodSettings {
    fn default() -> Self {
        NodePodSettings {
            jetson_image: DEFAULT_JETSON_IMAGE.into(),
            akida_image: DEFAULT_AKIDA_IMAGE.into(),
            cpu_image: DEFAULT_AKIDA_IMAGE.into(),
            image_pull_policy: PullPolicy::IfNotPresent,
            gpu_resource: DEFAULT_GPU_RESOURCE.into(),
            akida_resource: DEFAULT_AKIDA_RESOURCE.into(),
            state_volume: StateVolume::EmptyDir,
            state_host_root: DEFAULT_STATE_HOST_ROOT.into(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            node_uid: DEFAULT_NODE_UID,
        }
    }
}

/// A setting the operator cannot work with.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error("{flag} {value:?} is not an extended resource name (expected <domain>/<name>)")]
    ResourceName { flag: &'static str, value: String },
    #[error("--state-host-root {0:?} must be an absolute path")]
    StateHostRoot(String),
    #[error("{flag} is empty")]
    Empty { flag: &'static str },
}

impl NodePodSettings {
    /// Checks what clap cannot: resource names, paths and non-empty images.
    pub fn check(&self) -> Result<(), SettingsError> {
        for (flag, value) in [
            ("--gpu-resource", &self.gpu_resource),
            ("--akida-resource", &self.akida_resource),
        ] {
            if !is_extended_resource(value) {
                return Err(SettingsError::ResourceName {
                    flag,
                    value: value.clone(),
                });
            }
        }
        for (flag, value) in [
            ("--jetson-image", &self.jetson_image),
            ("--akida-image", &self.akida_image),
            ("--cpu-image", &self.cpu_image),
            ("--cluster-domain", &self.cluster_domain),
        ] {
            if value.trim().is_empty() {
                return Err(SettingsError::Empty { flag });
            }
        }
        if !self.state_host_root.starts_with('/') {
            return Err(SettingsError::StateHostRoot(self.state_host_root.clone()));
        }
        Ok(())
    }
}

/// Extended resources are `<domain>/<name>`, and `kubernetes.io` is reserved for built-ins.
fn is_extended_resource(name: &str) -> bool {
    let Some((domain, rest)) = name.split_once('/') else {
        return false;
    };
    let ok_chars = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    };
    ok_chars(domain) && ok_chars(rest) && domain.contains('.') && domain != "kubernetes.io"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_the_check_and_bad_resource_names_do_not() {
        assert_eq!(NodePodSettings::default().check(), Ok(()));
        let bad = NodePodSettings {
            akida_resource: "akida".into(),
            ..NodePodSettings::default()
        };
        assert!(matches!(
            bad.check(),
            Err(SettingsError::ResourceName {
                flag: "--akida-resource",
                ..
            })
        ));
        let bad = NodePodSettings {
            state_host_root: "var/lib".into(),
            ..NodePodSettings::default()
        };
        assert!(bad.check().is_err());
    }
}
