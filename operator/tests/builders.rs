//! The pure steps, tested on their output: validation, node configurations, identities and
//! the objects of a run.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{mk_federation, mk_node, FED, NS};
use edgesync_api::{DflNode, ModelKind};
use edgesync_operator::federation::build::{self, Source};
use edgesync_operator::federation::objects;
use edgesync_operator::federation::observe::{run_of, Observed, Run};
use edgesync_operator::federation::pod::pod;
use edgesync_operator::identity::Identity;
use edgesync_operator::names;
use edgesync_operator::node_config::{self, NodeConfig};
use edgesync_operator::settings::{NodePodSettings, StateVolume};
use edgesync_operator::validate::{self, Invalid, Member, Plan};
use k8s_openapi::api::core::v1::{Pod, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

fn owner() -> OwnerReference {
    objects::owner_reference(&mk_federation("{kind: ring}")).unwrap()
}

fn member(node: &DflNode) -> Member {
    let plan = validate::federation(
        &mk_federation("{kind: fullMesh}"),
        std::slice::from_ref(node),
    )
    .unwrap();
    plan.members[0].clone()
}

fn pod_spec(node: &DflNode, settings: &NodePodSettings) -> PodSpec {
    pod(FED, NS, &member(node), true, settings, &owner())
        .spec
        .unwrap()
}

fn seeded(names: &[&str]) -> BTreeMap<String, Identity> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.to_string(),
                Identity::from_seed([i as u8 + 1; 32]).unwrap(),
            )
        })
        .collect()
}

fn plan_of(topology: &str, nodes: &[DflNode]) -> Plan {
    validate::federation(&mk_federation(topology), nodes).unwrap()
}

#[test]
fn each_hardware_class_requests_its_device() {
    let settings = NodePodSettings::default();
    let requests = |spec: &PodSpec| spec.containers[0].resources.clone().unwrap();

    let jetson = pod_spec(&mk_node("a", "jetson", "jetson-cnn"), &settings);
    let r = requests(&jetson);
    assert_eq!(r.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(r.requests.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "2");
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "2Gi");
    let tolerated: Vec<_> = jetson
        .tolerations
        .unwrap()
        .into_iter()
        .filter_map(|t| t.key)
        .collect();
    assert!(
        tolerated.contains(&"nvidia.com/gpu".to_string()),
        "{tolerated:?}"
    );
    assert_eq!(
        jetson.containers[0].image.as_deref(),
        Some(settings.jetson_image.as_str())
    );

    let custom = NodePodSettings {
        akida_resource: "example.com/akd1000".into(),
        ..NodePodSettings::default()
    };
    let akida = requests(&pod_spec(&mk_node("b", "akida", "akida-cnn"), &custom));
    assert_eq!(akida.limits.as_ref().unwrap()["example.com/akd1000"].0, "1");
    assert!(!akida
        .limits
        .as_ref()
        .unwrap()
        .contains_key("nvidia.com/gpu"));

    let cpu = requests(&pod_spec(&mk_node("c", "cpu", "jetson-cnn"), &settings));
    let limits = cpu.limits.unwrap();
    assert_eq!(limits.keys().collect::<Vec<_>>(), ["memory"]);
}

#[test]
fn pods_are_pinned_to_their_host_through_the_scheduler() {
    let mut node = mk_node("a", "jetson", "jetson-cnn");
    node.spec
        .placement
        .node_selector
        .insert("edgesync.dev/board".into(), "orin".into());
    let spec = pod_spec(&node, &NodePodSettings::default());
    let selector = spec.node_selector.unwrap();
    assert_eq!(selector["kubernetes.io/hostname"], "host-a");
    assert_eq!(selector["edgesync.dev/board"], "orin");
    assert_eq!(spec.node_name, None);
    assert_eq!(spec.hostname.as_deref(), Some("fed-a"));
    assert_eq!(spec.subdomain.as_deref(), Some("fed-p2p"));
    assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
}

#[test]
fn data_is_read_only_and_state_is_writable() {
    let spec = pod_spec(
        &mk_node("a", "jetson", "jetson-cnn"),
        &NodePodSettings::default(),
    );
    let container = &spec.containers[0];
    let mounts: BTreeMap<_, _> = container
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
    assert_eq!(mounts["data"].mount_path, "/srv/data/cifar10");
    assert_eq!(mounts["data"].read_only, Some(true));
    assert_eq!(mounts["config"].read_only, Some(true));
    assert_eq!(mounts["identity"].read_only, Some(true));
    assert_eq!(mounts["state"].read_only, Some(false));
    assert_eq!(mounts["state"].mount_path, names::STATE_DIR);

    let volumes: BTreeMap<_, _> = spec
        .volumes
        .unwrap()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let data = volumes["data"].host_path.as_ref().unwrap();
    assert_eq!(data.path, "/srv/data/cifar10");
    assert_eq!(data.type_.as_deref(), Some("Directory"));
    assert!(volumes["state"].empty_dir.is_some());
    let secret = volumes["identity"].secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("fed-a-identity"));
    assert_eq!(secret.default_mode, Some(0o440));

    let host_state = NodePodSettings {
        state_volume: StateVolume::HostPath,
        ..NodePodSettings::default()
    };
    let spec = pod_spec(&mk_node("a", "jetson", "jetson-cnn"), &host_state);
    let state = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "state")
        .unwrap();
    assert_eq!(state.host_path.unwrap().path, "/var/lib/edgesync/lab/fed/a");

    let mut claimed = mk_node("a", "jetson", "jetson-cnn");
    claimed
        .annotations_mut()
        .insert(names::ANNOTATION_DATA_CLAIM.into(), "cifar-share".into());
    let spec = pod_spec(&claimed, &NodePodSettings::default());
    let data = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "data")
        .unwrap();
    let claim = data.persistent_volume_claim.unwrap();
    assert_eq!(claim.claim_name, "cifar-share");
    assert_eq!(claim.read_only, Some(true));
}

#[test]
fn containers_run_unprivileged_on_a_read_only_root() {
    let spec = pod_spec(
        &mk_node("a", "akida", "akida-cnn"),
        &NodePodSettings::default(),
    );
    let pod_ctx = spec.security_context.unwrap();
    assert_eq!(pod_ctx.run_as_non_root, Some(true));
    assert_eq!(pod_ctx.run_as_user, Some(10001));
    assert_eq!(pod_ctx.fs_group, Some(10001));
    assert_eq!(pod_ctx.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let c = &spec.containers[0];
    let ctx = c.security_context.clone().unwrap();
    assert_eq!(ctx.read_only_root_filesystem, Some(true));
    assert_eq!(ctx.allow_privilege_escalation, Some(false));
    assert_eq!(
        ctx.capabilities.unwrap().drop,
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(c.command.as_deref(), Some(&["dfl-node".to_string()][..]));
    assert_eq!(
        c.args.clone().unwrap(),
        ["run", "--config", "/etc/edgesync/config.yaml"]
    );
}

#[test]
fn node_pods_serve_metrics_on_a_named_port_that_the_kubelet_probes() {
    let spec = pod_spec(
        &mk_node("a", "cpu", "akida-cnn"),
        &NodePodSettings::default(),
    );
    let c = &spec.containers[0];
    let ports: Vec<(Option<&str>, i32)> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("p2p"), 7400), (Some("metrics"), 9400)]);
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.clone().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
    }

    // A configuration from before nodes served metrics: no port to probe, so no probes
    // that would restart the pod for ever.
    let old = pod(
        FED,
        NS,
        &member(&mk_node("a", "cpu", "akida-cnn")),
        false,
        &NodePodSettings::default(),
        &owner(),
    );
    let c = &old.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.ports.as_ref().unwrap().len(), 1);
    assert!(c.readiness_probe.is_none() && c.liveness_probe.is_none());

    let service = objects::service(&mk_federation("{kind: ring}"), NS, &owner());
    let ports: Vec<(Option<&str>, i32)> = service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.as_deref(), p.port))
        .collect();
    assert_eq!(ports, [(Some("p2p"), 7400), (Some("metrics"), 9400)]);
}

#[test]
fn a_member_may_patch_only_its_own_status() {
    let (account, role, binding) = objects::rbac(FED, "a", NS, &owner());
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    let rule = &rules[0];
    assert_eq!(
        rule.api_groups.as_deref(),
        Some(&["edgesync.dev".to_string()][..])
    );
    assert_eq!(
        rule.resources.as_deref(),
        Some(&["dflnodes/status".to_string()][..])
    );
    assert_eq!(rule.resource_names.as_deref(), Some(&["a".to_string()][..]));
    assert_eq!(rule.verbs, ["get", "patch"]);
    assert_eq!(binding.role_ref.name, "fed-a");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(subject.name, account.name_any());
    assert_eq!(subject.namespace.as_deref(), Some(NS));

    let spec = pod_spec(
        &mk_node("a", "jetson", "jetson-cnn"),
        &NodePodSettings::default(),
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("fed-a"));
}

#[test]
fn configurations_list_every_member_at_its_stable_address() {
    let nodes = [
        mk_node("a", "jetson", "jetson-cnn"),
        mk_node("b", "jetson", "jetson-cnn"),
        mk_node("c", "akida", "akida-cnn"),
        mk_node("d", "cpu", "jetson-cnn"),
    ];
    let plan = plan_of("{kind: ring}", &nodes);
    let ids = seeded(&["a", "b", "c", "d"]);
    let fed = mk_federation("{kind: ring}");
    let configs = node_config::build(&fed, NS, &plan, &ids, "cluster.local").unwrap();
    assert_eq!(configs.len(), 4);
    let a = &configs[0];
    assert_eq!(a.name, "a");
    assert_eq!(a.listen, "/ip4/0.0.0.0/tcp/7400");
    assert_eq!(
        a.key_file,
        Path::new("/var/run/edgesync/identity/identity.key")
    );
    assert_eq!(a.state_dir, Path::new(names::STATE_DIR));
    let addresses: Vec<&str> = a.members.iter().map(|m| m.addresses[0].as_str()).collect();
    assert_eq!(
        addresses,
        [
            "/dns4/fed-a.fed-p2p.lab.svc.cluster.local/tcp/7400",
            "/dns4/fed-b.fed-p2p.lab.svc.cluster.local/tcp/7400",
            "/dns4/fed-c.fed-p2p.lab.svc.cluster.local/tcp/7400",
            "/dns4/fed-d.fed-p2p.lab.svc.cluster.local/tcp/7400",
        ]
    );
    let neighbours: Vec<&str> = a
        .members
        .iter()
        .filter(|m| m.neighbour)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(neighbours, ["b", "d"]);
    assert_eq!(a.members[1].peer_id, ids["b"].peer_id);
    assert_eq!(a.members[2].model.kind, ModelKind::AkidaCnn);
    assert_eq!(a.members[2].model.in_channels, 3);
    assert_eq!(a.members[2].model.classes, 10);
    assert_eq!(a.members[0].dataset_key, "Cifar10Bin:/srv/data/cifar10");
}

#[test]
fn configuration_yaml_has_the_keys_the_node_reads() {
    let nodes = [mk_node("a", "jetson", "jetson-cnn")];
    let plan = plan_of("{kind: fullMesh}", &nodes);
    let configs = node_config::build(
        &mk_federation("{kind: fullMesh}"),
        NS,
        &plan,
        &seeded(&["a"]),
        "c.l",
    )
    .unwrap();
    let yaml = configs[0].to_yaml().unwrap();
    let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let keys: Vec<&str> = value
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "federation",
            "name",
            "federationSpec",
            "nodeSpec",
            "keyFile",
            "listen",
            "members",
            "stateDir",
            "threads",
            "metricsAddress"
        ]
    );
    // The node parses this as a socket address and serves on every interface.
    assert_eq!(value["metricsAddress"], "0.0.0.0:9400");
    let member: Vec<&str> = value["members"][0]
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(
        member,
        [
            "name",
            "peerId",
            "addresses",
            "model",
            "datasetKey",
            "neighbour"
        ]
    );
    assert_eq!(value["members"][0]["model"]["inChannels"], 3);
    assert_eq!(NodeConfig::parse(&yaml).unwrap(), configs[0]);

    // Configurations of runs started before nodes served metrics still parse.
    let mut old = value.clone();
    old.as_mapping_mut().unwrap().remove("metricsAddress");
    let old = NodeConfig::parse(&serde_yaml::to_string(&old).unwrap()).unwrap();
    assert_eq!(old.metrics_address, None);
}

fn secret_of(identity: &Identity, node: &str) -> Secret {
    let mut secret = objects::identity_secret(FED, node, NS, identity, &owner());
    secret.metadata.uid = Some(format!("uid-{node}"));
    secret
}

#[test]
fn identities_are_kept_once_generated() {
    let nodes = [
        mk_node("a", "jetson", "jetson-cnn"),
        mk_node("b", "cpu", "jetson-cnn"),
    ];
    let plan = plan_of("{kind: ring}", &nodes);
    let kept = Identity::from_seed([9; 32]).unwrap();
    let observed = Observed {
        secrets: vec![secret_of(&kept, "a")],
        ..Observed::default()
    };
    let sources = build::sources(
        &Run::default(),
        &mk_federation("{kind: ring}").spec,
        Some(&plan),
    );
    let mut generated = 0;
    let ids = build::identities(FED, &observed, &Run::default(), &sources, || {
        generated += 1;
        Identity::from_seed([7; 32])
    })
    .unwrap();
    assert_eq!(
        generated, 1,
        "only the member without a Secret gets a new key"
    );
    assert_eq!(ids.known["a"], kept);
    assert!(!ids.new.contains("a"));
    assert!(ids.new.contains("b"));

    let desired = build::desired(&build::Inputs {
        fed: &mk_federation("{kind: ring}"),
        namespace: NS,
        owner: &owner(),
        observed: &observed,
        run: &Run::default(),
        plan: Some(&plan),
        sources: &sources,
        ids: &ids,
        settings: &NodePodSettings::default(),
    })
    .unwrap();
    let a = desired.members.iter().find(|m| m.name == "a").unwrap();
    assert!(
        a.secret.is_none(),
        "an existing identity Secret is never rewritten"
    );
    let b = desired.members.iter().find(|m| m.name == "b").unwrap();
    let secret = b.secret.as_ref().unwrap();
    assert_eq!(secret.immutable, Some(true));
    assert_eq!(
        Identity::from_secret(secret).unwrap().peer_id,
        ids.known["b"].peer_id
    );

    let mut damaged = secret_of(&kept, "a");
    damaged.data = Some(BTreeMap::from([(
        names::IDENTITY_KEY.to_string(),
        k8s_openapi::ByteString(vec![0; 4]),
    )]));
    let observed = Observed {
        secrets: vec![damaged],
        ..Observed::default()
    };
    // Only b, which has no Secret, gets a key; a's damaged key is reported, not replaced.
    let ids = build::identities(FED, &observed, &Run::default(), &sources, || {
        Identity::from_seed([8; 32])
    })
    .unwrap();
    assert!(matches!(&ids.problems[..], [Invalid::Identity { node, .. }] if node == "a"));
    assert_eq!(ids.new.iter().collect::<Vec<_>>(), ["b"]);
}

#[test]
fn a_running_member_is_rebuilt_from_its_configmap_and_a_lost_key_is_reported() {
    let nodes = [
        mk_node("a", "jetson", "jetson-cnn"),
        mk_node("b", "cpu", "jetson-cnn"),
    ];
    let fed = mk_federation("{kind: ring}");
    let plan = plan_of("{kind: ring}", &nodes);
    let ids = seeded(&["a", "b"]);
    let configs = node_config::build(&fed, NS, &plan, &ids, "cluster.local").unwrap();
    let config_maps: Vec<_> = configs
        .iter()
        .map(|c| objects::config_map(NS, c, None, &owner()).unwrap())
        .collect();
    let (run, problems) = run_of(&config_maps);
    assert!(problems.is_empty());
    assert_eq!(run.members.len(), 2);

    // The DflNode of b changed since the run started: b's pod still gets b's original spec.
    let mut changed = nodes.clone();
    changed[1].spec.placement.node_name = Some("elsewhere".into());
    let plan_now = plan_of("{kind: ring}", &changed);
    let sources = build::sources(&run, &fed.spec, Some(&plan_now));
    assert_eq!(sources.members["b"], Source::Running);
    assert_eq!(sources.drift.as_ref().unwrap().changed, ["b"]);

    let observed = Observed {
        secrets: vec![secret_of(&ids["b"], "b")],
        pods: vec![Pod {
            metadata: kube::core::ObjectMeta {
                name: Some("fed-a".into()),
                ..Default::default()
            },
            ..Pod::default()
        }],
        ..Observed::default()
    };
    let idents = build::identities(FED, &observed, &run, &sources, || {
        panic!("running members never get new keys")
    })
    .unwrap();
    assert!(matches!(&idents.problems[..], [Invalid::Identity { node, .. }] if node == "a"));
    let desired = build::desired(&build::Inputs {
        fed: &fed,
        namespace: NS,
        owner: &owner(),
        observed: &observed,
        run: &run,
        plan: Some(&plan_now),
        sources: &sources,
        ids: &idents,
        settings: &NodePodSettings::default(),
    })
    .unwrap();
    assert_eq!(
        desired.members.len(),
        1,
        "a lost its key and is not rebuilt"
    );
    let b = &desired.members[0];
    assert!(b.config_map.is_none() && b.secret.is_none());
    let pod = &b.workload.as_ref().unwrap().pod;
    let selector = pod.spec.as_ref().unwrap().node_selector.clone().unwrap();
    assert_eq!(selector["kubernetes.io/hostname"], "host-b");
    assert!(desired.service.is_some());
}

#[test]
fn every_object_is_owned_by_the_federation() {
    let nodes = [mk_node("a", "jetson", "jetson-cnn")];
    let fed = mk_federation("{kind: fullMesh}");
    let plan = plan_of("{kind: fullMesh}", &nodes);
    let sources = build::sources(&Run::default(), &fed.spec, Some(&plan));
    let ids = build::identities(FED, &Observed::default(), &Run::default(), &sources, || {
        Identity::from_seed([3; 32])
    })
    .unwrap();
    let d = build::desired(&build::Inputs {
        fed: &fed,
        namespace: NS,
        owner: &owner(),
        observed: &Observed::default(),
        run: &Run::default(),
        plan: Some(&plan),
        sources: &sources,
        ids: &ids,
        settings: &NodePodSettings::default(),
    })
    .unwrap();
    let m = &d.members[0];
    let w = m.workload.as_ref().unwrap();
    let metas = [
        &d.service.as_ref().unwrap().metadata,
        &m.secret.as_ref().unwrap().metadata,
        &m.config_map.as_ref().unwrap().metadata,
        &w.account.metadata,
        &w.role.metadata,
        &w.binding.metadata,
        &w.pod.metadata,
    ];
    for meta in metas {
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, common::FED_UID);
        assert_eq!(owners[0].kind, "FederationRound");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some(NS));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[names::LABEL_FEDERATION], FED);
        assert_eq!(labels[names::LABEL_MANAGED_BY], names::MANAGER);
    }
    let service = d.service.as_ref().unwrap().spec.clone().unwrap();
    assert_eq!(service.cluster_ip.as_deref(), Some("None"));
    assert_eq!(service.publish_not_ready_addresses, Some(true));
}

#[test]
fn invalid_specs_are_reported_with_reasons() {
    let fed = mk_federation("{kind: ring}");
    let reasons = |nodes: &[DflNode], fed: &edgesync_api::FederationRound| -> Vec<&'static str> {
        validate::federation(fed, nodes)
            .unwrap_err()
            .iter()
            .map(Invalid::reason)
            .collect()
    };
    assert_eq!(
        reasons(&[mk_node("a", "akida", "jetson-cnn")], &fed),
        ["UnsupportedModel"]
    );
    let mut other = mk_node("a", "jetson", "jetson-cnn");
    other
        .labels_mut()
        .insert("federation".into(), "other".into());
    assert_eq!(reasons(&[other], &fed), ["NoNodesSelected"]);
    let explicit = mk_federation("{kind: explicit, edges: [[a, ghost]]}");
    assert_eq!(
        reasons(&[mk_node("a", "jetson", "jetson-cnn")], &explicit),
        ["InvalidTopology"]
    );
    let empty = mk_federation("{kind: explicit, edges: []}");
    assert_eq!(
        reasons(&[mk_node("a", "jetson", "jetson-cnn")], &empty),
        ["InvalidTopology"]
    );
    let mut relative = mk_node("a", "jetson", "jetson-cnn");
    relative.spec.dataset.path = "data/cifar10".into();
    assert_eq!(reasons(&[relative], &fed), ["InvalidDatasetPath"]);
    let mut folder = mk_node("a", "jetson", "jetson-cnn");
    folder.spec.dataset.format = edgesync_api::DatasetFormat::ImageFolder;
    assert_eq!(reasons(&[folder.clone()], &fed), ["MissingClassCount"]);
    folder
        .annotations_mut()
        .insert(names::ANNOTATION_CLASSES.into(), "37".into());
    assert_eq!(plan_of("{kind: ring}", &[folder]).members[0].classes, 37);
    let long = mk_node(&"n".repeat(62), "jetson", "jetson-cnn");
    assert_eq!(reasons(&[long], &fed), ["InvalidName"]);
    let mut bad_memory = mk_node("a", "jetson", "jetson-cnn");
    bad_memory.spec.resources.as_mut().unwrap().memory = Some("2GB".into());
    assert_eq!(reasons(&[bad_memory], &fed), ["InvalidResources"]);

    // Several problems are all reported.
    let all = reasons(
        &[
            mk_node("a", "akida", "jetson-cnn"),
            mk_node("b", "akida", "jetson-cnn"),
        ],
        &fed,
    );
    assert_eq!(all, ["UnsupportedModel", "UnsupportedModel"]);
}
