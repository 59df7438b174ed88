//! The desired objects of a reconciliation, from what was observed, the run in progress and
//! the plan for the current spec. Pure, apart from generating keys for members that have
//! none, which [`identities`] does through the function it is given.
//!
//! Only what is missing is built: a member's Secret and ConfigMap are written once and
//! never changed, and its ServiceAccount, Role, RoleBinding and Pod are (re)built only when
//! its pod is gone. A steady federation therefore costs its reconciliations a few lists and
//! no writes.

use std::collections::{BTreeMap, BTreeSet};

use edgesync_api::{FederationRound, FederationRoundSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;

use super::objects::{self, BuildError};
use super::observe::{Observed, Run, RunningMember};
use super::pod;
use super::status::{self, Drift};
use crate::identity::{Identity, IdentityError};
use crate::names;
use crate::node_config;
use crate::settings::NodePodSettings;
use crate::validate::{Invalid, Member, Plan};

/// Where a member's configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Built from the current spec: a new run, or a member whose ConfigMap went missing
    /// while the spec stayed as the run started.
    Plan,
    /// Kept from the member's ConfigMap.
    Running,
}

/// Which members are built from where, and what keeps others from being built.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    pub members: BTreeMap<String, Source>,
    pub drift: Option<Drift>,
    pub problems: Vec<Invalid>,
}

/// Decides, for every member of the run (or of the plan, when nothing runs), where its
/// configuration comes from.
pub fn sources(run: &Run, spec: &FederationRoundSpec, plan: Option<&Plan>) -> Sources {
    let mut out = Sources::default();
    if run.is_empty() {
        if let Some(plan) = plan {
            out.members = plan
                .members
                .iter()
                .map(|m| (m.name.clone(), Source::Plan))
                .collect();
            out.drift = Some(Drift::default());
        }
        return out;
    }
    let drift = plan.map(|p| status::drift(run, spec, p));
    let missing: Vec<String> = run
        .members
        .iter()
        .filter(|m| !run.configs.contains_key(*m))
        .cloned()
        .collect();
    let rebuildable = drift.as_ref().is_some_and(Drift::is_empty);
    for name in &run.members {
        let source = if run.configs.contains_key(name) {
            Source::Running
        } else if rebuildable {
            Source::Plan
        } else {
            continue;
        };
        out.members.insert(name.clone(), source);
    }
    if !missing.is_empty() && !rebuildable {
        out.problems.push(Invalid::IncompleteRun { missing });
    }
    out.drift = drift;
    out
}

/// Members' identities: read from their Secrets, or generated for members built from the
/// plan that have none yet.
#[derive(Debug, Default)]
pub struct Identities {
    pub known: BTreeMap<String, Identity>,
    /// Members whose identity was generated now and whose Secret must be written.
    pub new: BTreeSet<String>,
    pub problems: Vec<Invalid>,
}

pub fn identities(
    fed: &str,
    observed: &Observed,
    run: &Run,
    sources: &Sources,
    mut generate: impl FnMut() -> Result<Identity, IdentityError>,
) -> Result<Identities, IdentityError> {
    let mut out = Identities::default();
    for (name, source) in &sources.members {
        let secret = observed.secret(&names::identity_secret_name(fed, name));
        let identity = match (secret, source) {
            (Some(secret), _) => match Identity::from_secret(secret) {
                Ok(identity) => identity,
                Err(e) => {
                    out.problems.push(Invalid::Identity {
                        node: name.clone(),
                        detail: e.to_string(),
                    });
                    continue;
                }
            },
            (None, Source::Plan) => {
                out.new.insert(name.clone());
                generate()?
            }
            (None, Source::Running) => {
                out.problems.push(Invalid::Identity {
                    node: name.clone(),
                    detail: "its Secret is missing, and the other members accept only the \
                             identity they were configured with"
                        .into(),
                });
                continue;
            }
        };
        let recorded = run
            .configs
            .get(name)
            .and_then(|r| r.config.me())
            .map(|m| m.peer_id.as_str());
        if recorded.is_some_and(|peer| peer != identity.peer_id) {
            out.problems.push(Invalid::Identity {
                node: name.clone(),
                detail: "its Secret holds a key other than the one the run was configured \
                         with"
                    .into(),
            });
            continue;
        }
        out.known.insert(name.clone(), identity);
    }
    Ok(out)
}

/// A member's pod and the account it runs as.
#[derive(Debug, Clone)]
pub struct Workload {
    pub account: ServiceAccount,
    pub role: Role,
    pub binding: RoleBinding,
    pub pod: Pod,
}

/// What to write for one member; `None` where the object exists already.
#[derive(Debug, Clone)]
pub struct MemberObjects {
    pub name: String,
    pub secret: Option<Secret>,
    pub config_map: Option<ConfigMap>,
    pub workload: Option<Workload>,
}

/// Everything to write.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub service: Option<Service>,
    pub members: Vec<MemberObjects>,
}

/// What [`desired`] builds from.
pub struct Inputs<'a> {
    pub fed: &'a FederationRound,
    pub namespace: &'a str,
    pub owner: &'a OwnerReference,
    pub observed: &'a Observed,
    pub run: &'a Run,
    /// The plan for the current spec, if it validates.
    pub plan: Option<&'a Plan>,
    pub sources: &'a Sources,
    pub ids: &'a Identities,
    pub settings: &'a NodePodSettings,
}

/// Builds what is missing.
pub fn desired(inputs: &Inputs) -> Result<Desired, BuildError> {
    let Inputs {
        fed,
        namespace,
        owner,
        observed,
        run,
        plan,
        sources,
        ids,
        settings,
    } = *inputs;
    let fed_name = fed.name_any();
    let planned: BTreeMap<&str, &Member> = plan
        .map(|p| p.members.iter().map(|m| (m.name.as_str(), m)).collect())
        .unwrap_or_default();
    let configs = match plan {
        Some(p) if sources.members.values().any(|s| *s == Source::Plan) => {
            node_config::build(fed, namespace, p, &ids.known, &settings.cluster_domain)?
        }
        _ => Vec::new(),
    };

    let mut members = Vec::new();
    for (name, source) in &sources.members {
        let Some(identity) = ids.known.get(name) else {
            continue;
        };
        // Whether the member's configuration names a metrics address decides its probes.
        let (member, config_map, serves_metrics) = match source {
            Source::Plan => {
                let (Some(member), Some(config)) = (
                    planned.get(name.as_str()),
                    configs.iter().find(|c| &c.name == name),
                ) else {
                    continue;
                };
                let cm =
                    objects::config_map(namespace, config, member.data_claim.as_deref(), owner)?;
                let serves_metrics = config.metrics_address.is_some();
                ((*member).clone(), Some(cm), serves_metrics)
            }
            Source::Running => {
                let running = run.configs.get(name);
                match running.and_then(running_member) {
                    Some(member) => {
                        let serves_metrics =
                            running.is_some_and(|r| r.config.metrics_address.is_some());
                        (member, None, serves_metrics)
                    }
                    None => continue,
                }
            }
        };
        let secret = ids
            .new
            .contains(name)
            .then(|| objects::identity_secret(&fed_name, name, namespace, identity, owner));
        let pod_name = names::member_name(&fed_name, name);
        let workload = observed.pod(&pod_name).is_none().then(|| {
            let (account, role, binding) = objects::rbac(&fed_name, name, namespace, owner);
            Workload {
                account,
                role,
                binding,
                pod: pod::pod(
                    &fed_name,
                    namespace,
                    &member,
                    serves_metrics,
                    settings,
                    owner,
                ),
            }
        });
        members.push(MemberObjects {
            name: name.clone(),
            secret,
            config_map,
            workload,
        });
    }
    let any_pod = members.iter().any(|m| m.workload.is_some());
    Ok(Desired {
        service: any_pod.then(|| objects::service(fed, namespace, owner)),
        members,
    })
}

/// A running member as the pod builder needs it, from its own configuration.
fn running_member(running: &RunningMember) -> Option<Member> {
    let me = running.config.me()?;
    Some(Member {
        name: running.config.name.clone(),
        spec: running.config.node_spec.clone(),
        classes: me.model.classes,
        data_claim: running.data_claim.clone(),
    })
}
