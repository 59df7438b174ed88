//! The pod of one member: pinned to its device's host, requesting the device through its
//! plugin, reading its data read-only from the host and writing checkpoints to its own
//! volume, as an unprivileged user on a read-only root filesystem, serving its metrics and
//! health endpoints on a named port the kubelet probes. Pure.
//!
//! Configurations written by operators before nodes served metrics name no metrics
//! address; a pod recreated for such a run gets neither the port nor the probes, which
//! would otherwise fail for ever and restart it in a loop.

use std::collections::BTreeMap;

use edgesync_api::{Hardware, NodeResources};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::names::{self, CONFIG_DIR, CONFIG_KEY, IDENTITY_DIR, P2P_PORT, STATE_DIR};
use crate::settings::{NodePodSettings, StateVolume};
use crate::validate::Member;

/// Taint key an edge host may carry to keep other workloads off it.
pub const DEDICATED_TAINT: &str = "edgesync.dev/dedicated";
/// Seconds a node gets after SIGTERM: it finishes its round and checkpoints, which takes a
/// round deadline (30 s by default) plus its local steps.
const GRACE_SECONDS: i64 = 120;
/// Secret files readable by the pod's group (the node user's fsGroup), not by others.
const SECRET_MODE: i32 = 0o440;
/// TCP port a node serves `/metrics`, `/healthz` and `/readyz` on; the operator writes it
/// into every node's configuration.
pub const METRICS_PORT: i32 = 9400;
/// Name of the metrics port, which probes, the headless Service and monitors refer to.
pub const METRICS_PORT_NAME: &str = "metrics";

/// The extended resource a member's pod requests, if its hardware needs one.
pub fn device_resource(hardware: Hardware, settings: &NodePodSettings) -> Option<&str> {
    match hardware {
        Hardware::Jetson => Some(&settings.gpu_resource),
        Hardware::Akida => Some(&settings.akida_resource),
        Hardware::Cpu => None,
    }
}

fn image(hardware: Hardware, settings: &NodePodSettings) -> &str {
    match hardware {
        Hardware::Jetson => &settings.jetson_image,
        Hardware::Akida => &settings.akida_image,
        Hardware::Cpu => &settings.cpu_image,
    }
}

/// The member's pod; `serves_metrics` says whether its configuration names a metrics
/// address.
pub fn pod(
    fed: &str,
    namespace: &str,
    member: &Member,
    serves_metrics: bool,
    settings: &NodePodSettings,
    owner: &OwnerReference,
) -> Pod {
    let name = names::member_name(fed, &member.name);
    let spec = &member.spec;
    let device = device_resource(spec.hardware, settings);

    // Pinning through the scheduler (a hostname selector) rather than spec.nodeName keeps
    // device accounting and taint checks, which spec.nodeName would bypass.
    let mut node_selector = spec.placement.node_selector.clone();
    if let Some(host) = &spec.placement.node_name {
        node_selector.insert("kubernetes.io/hostname".into(), host.clone());
    }
    let mut tolerations = vec![toleration(DEDICATED_TAINT)];
    tolerations.extend(device.map(toleration));

    let mut env = vec![
        field_env("EDGESYNC_NAMESPACE", "metadata.namespace"),
        field_env("EDGESYNC_POD_NAME", "metadata.name"),
        EnvVar {
            name: "EDGESYNC_LOG_FORMAT".into(),
            value: Some("json".into()),
            ..EnvVar::default()
        },
    ];
    env.sort_by(|a, b| a.name.cmp(&b.name));

    let mut ports = vec![ContainerPort {
        name: Some("p2p".into()),
        container_port: P2P_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }];
    if serves_metrics {
        ports.push(ContainerPort {
            name: Some(METRICS_PORT_NAME.into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
    }

    let container = Container {
        name: "dfl-node".into(),
        image: Some(image(spec.hardware, settings).to_string()),
        image_pull_policy: Some(settings.image_pull_policy.as_str().into()),
        command: Some(vec!["dfl-node".into()]),
        args: Some(vec![
            "run".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        env: Some(env),
        ports: Some(ports),
        // Ready once data is loaded, the model built, the node listening and a peer
        // connected (or none expected); the headless Service publishes addresses before
        // that anyway, so readiness only informs, it never keeps peers apart.
        readiness_probe: serves_metrics.then(|| probe("/readyz", 5, 3)),
        // /healthz answers from the node's async runtime while training runs beside it,
        // so only a hung process fails it; a minute of failures allows for a board
        // saturated by a training step.
        liveness_probe: serves_metrics.then(|| probe("/healthz", 10, 6)),
        resources: Some(resources(spec.resources.as_ref(), device)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("config", CONFIG_DIR, true),
            mount("identity", IDENTITY_DIR, true),
            mount("data", &spec.dataset.path, true),
            mount("state", STATE_DIR, false),
            // libtorch and the allocator write temporary files; the root is read-only.
            mount("tmp", "/tmp", false),
        ]),
        ..Container::default()
    };

    Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(names::member_labels(fed, &member.name)),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            // Host name and subdomain give the pod the DNS name in the member addresses.
            hostname: Some(name.clone()),
            subdomain: Some(names::service_name(fed)),
            service_account_name: Some(name),
            // The node reports its progress into its DflNode status with this account.
            automount_service_account_token: Some(true),
            // A node that completed its rounds exits 0 and stays done; one that crashed is
            // restarted and resumes from its checkpoint.
            restart_policy: Some("OnFailure".into()),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(GRACE_SECONDS),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: Some(tolerations),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(settings.node_uid),
                run_as_group: Some(settings.node_uid),
                fs_group: Some(settings.node_uid),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![container],
            volumes: Some(volumes(fed, namespace, member, settings)),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// An HTTP probe of the metrics port. The node serves it before it loads its data, so no
/// start-up delay is needed.
fn probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(METRICS_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn toleration(key: &str) -> Toleration {
    Toleration {
        key: Some(key.to_string()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// CPU and memory as the `DflNode` asks, plus one device. Extended resources cannot be
/// overcommitted, so their request and limit are equal; memory is limited to its request
/// so one node cannot starve the others on a small board.
fn resources(spec: Option<&NodeResources>, device: Option<&str>) -> ResourceRequirements {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(r) = spec {
        if let Some(cpu) = &r.cpu {
            requests.insert("cpu".to_string(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &r.memory {
            requests.insert("memory".to_string(), Quantity(memory.clone()));
            limits.insert("memory".to_string(), Quantity(memory.clone()));
        }
    }
    if let Some(device) = device {
        requests.insert(device.to_string(), Quantity("1".into()));
        limits.insert(device.to_string(), Quantity("1".into()));
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

fn volumes(fed: &str, namespace: &str, member: &Member, settings: &NodePodSettings) -> Vec<Volume> {
    let data = match &member.data_claim {
        Some(claim) => Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        },
        None => Volume {
            name: "data".into(),
            host_path: Some(HostPathVolumeSource {
                path: member.spec.dataset.path.clone(),
                // The data must already be on the host; an empty folder would only fail
                // later with a less clear error.
                type_: Some("Directory".into()),
            }),
            ..Volume::default()
        },
    };
    let state = match settings.state_volume {
        StateVolume::EmptyDir => Volume {
            name: "state".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        StateVolume::HostPath => Volume {
            name: "state".into(),
            host_path: Some(HostPathVolumeSource {
                path: format!(
                    "{}/{namespace}/{fed}/{}",
                    settings.state_host_root.trim_end_matches('/'),
                    member.name
                ),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Volume::default()
        },
    };
    vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config_map_name(fed, &member.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "identity".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::identity_secret_name(fed, &member.name)),
                default_mode: Some(SECRET_MODE),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        data,
        state,
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ]
}
