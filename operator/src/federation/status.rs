//! The `FederationRound` status, computed from what was observed: each member's pod and
//! `DflNode` status, the problems validation found, and how the current spec differs from
//! the configuration the running nodes started with. Pure.

use edgesync_api::{
    Condition, DflNode, FederationPhase, FederationRoundSpec, FederationRoundStatus, NodePhase,
    NodeSummary,
};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::observe::{Run, RunningMember};
use crate::names::LABEL_NODE;
use crate::validate::{Invalid, Plan};

pub const READY: &str = "Ready";
pub const CONFIGURATION_CURRENT: &str = "ConfigurationCurrent";

/// Container waiting reasons that will not clear without someone changing something.
const STUCK_REASONS: [&str; 5] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
];

/// How the current spec differs from the one the running nodes were configured with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Drift {
    /// `FederationRound` spec fields that changed, as `spec.<field>`.
    pub fields: Vec<String>,
    /// Nodes now selected that are not in the run.
    pub added: Vec<String>,
    /// Nodes in the run that are no longer selected.
    pub removed: Vec<String>,
    /// Nodes of the run whose `DflNode` spec changed.
    pub changed: Vec<String>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (label, items) in [
            ("FederationRound fields", &self.fields),
            ("DflNodes added", &self.added),
            ("DflNodes removed", &self.removed),
            ("DflNodes changed", &self.changed),
        ] {
            if !items.is_empty() {
                parts.push(format!("{label}: {}", items.join(", ")));
            }
        }
        parts.join("; ")
    }
}

/// Compares the run in progress with the plan for the current spec.
pub fn drift(run: &Run, spec: &FederationRoundSpec, plan: &Plan) -> Drift {
    let mut out = Drift::default();
    if let Some(RunningMember { config, .. }) = run.configs.values().next() {
        let before = serde_json::to_value(&config.federation_spec).unwrap_or_default();
        let now = serde_json::to_value(spec).unwrap_or_default();
        if let (Some(before), Some(now)) = (before.as_object(), now.as_object()) {
            let mut keys: Vec<&String> = before.keys().chain(now.keys()).collect();
            keys.sort();
            keys.dedup();
            out.fields = keys
                .into_iter()
                .filter(|k| before.get(*k) != now.get(*k))
                .map(|k| format!("spec.{k}"))
                .collect();
        }
    }
    for member in &plan.members {
        if !run.members.contains(&member.name) {
            out.added.push(member.name.clone());
        } else if run
            .configs
            .get(&member.name)
            .is_some_and(|r| r.config.node_spec != member.spec)
        {
            out.changed.push(member.name.clone());
        }
    }
    out.removed = run
        .members
        .iter()
        .filter(|name| !plan.members.iter().any(|m| &&m.name == name))
        .cloned()
        .collect();
    out
}

/// Everything the status is computed from.
pub struct StatusInput<'a> {
    /// Members of the run; empty when nothing was started.
    pub members: &'a [String],
    pub nodes: &'a [DflNode],
    pub pods: &'a [Pod],
    /// Problems of the current spec.
    pub problems: &'a [Invalid],
    /// Differences from the running configuration; `None` when there is nothing to
    /// compare (no run, or a spec that does not validate).
    pub drift: Option<&'a Drift>,
    /// Conditions of the previous status, whose transition times are kept.
    pub previous: &'a [Condition],
    /// RFC 3339 time of this reconciliation.
    pub now: &'a str,
}

/// The new status.
pub fn build(input: &StatusInput) -> FederationRoundStatus {
    let summaries: Vec<NodeSummary> = input
        .members
        .iter()
        .map(|name| summary(name, input.nodes, input.pods))
        .collect();
    let phase = phase(&summaries, input.problems);
    let live = summaries
        .iter()
        .filter(|s| s.phase != Some(NodePhase::Failed));
    let current_round = live.filter_map(|s| s.round).min();
    let accuracies: Vec<f64> = summaries.iter().filter_map(|s| s.accuracy).collect();
    let mean_accuracy =
        (!accuracies.is_empty()).then(|| accuracies.iter().sum::<f64>() / accuracies.len() as f64);

    let mut conditions = vec![ready(input, &summaries)];
    if !input.members.is_empty() {
        conditions.push(configuration_current(input));
    }
    for c in &mut conditions {
        c.last_transition_time = Some(
            input
                .previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
                .and_then(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| input.now.to_string()),
        );
    }
    FederationRoundStatus {
        phase: Some(phase),
        current_round,
        nodes: summaries,
        mean_accuracy,
        consensus_distance: None,
        conditions,
    }
}

/// A member's pod phase is the authority on whether it runs; its `DflNode` status adds the
/// round and accuracy the node reported.
fn summary(name: &str, nodes: &[DflNode], pods: &[Pod]) -> NodeSummary {
    let pod = pods
        .iter()
        .find(|p| p.labels().get(LABEL_NODE).is_some_and(|n| n == name));
    let reported = nodes
        .iter()
        .find(|n| n.name_any() == name)
        .and_then(|n| n.status.as_ref());
    NodeSummary {
        name: name.to_string(),
        round: reported.and_then(|s| s.round),
        accuracy: reported.and_then(|s| s.accuracy),
        phase: Some(pod_phase(pod)),
    }
}

/// What a member's pod says about the node in it.
pub fn pod_phase(pod: Option<&Pod>) -> NodePhase {
    let Some(pod) = pod.filter(|p| p.metadata.deletion_timestamp.is_none()) else {
        return NodePhase::Pending;
    };
    let status = pod.status.as_ref();
    let stuck = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
        .any(|r| STUCK_REASONS.contains(&r));
    match status.and_then(|s| s.phase.as_deref()) {
        _ if stuck => NodePhase::Failed,
        Some("Succeeded") => NodePhase::Succeeded,
        Some("Failed") => NodePhase::Failed,
        Some("Running") => NodePhase::Training,
        _ => NodePhase::Pending,
    }
}

fn phase(summaries: &[NodeSummary], problems: &[Invalid]) -> FederationPhase {
    if summaries.is_empty() {
        // Nothing started: a selector that matches nothing yet may be fixed by creating
        // the DflNodes; anything else is a spec that cannot run.
        let waiting = problems
            .iter()
            .all(|p| matches!(p, Invalid::NoNodes { .. }));
        return if waiting {
            FederationPhase::Pending
        } else {
            FederationPhase::Failed
        };
    }
    let count = |phase: NodePhase| summaries.iter().filter(|s| s.phase == Some(phase)).count();
    let (failed, succeeded, training) = (
        count(NodePhase::Failed),
        count(NodePhase::Succeeded),
        count(NodePhase::Training),
    );
    if succeeded == summaries.len() {
        FederationPhase::Succeeded
    } else if failed > 0 && failed + succeeded == summaries.len() {
        FederationPhase::Failed
    } else if failed > 0 {
        FederationPhase::Degraded
    } else if training > 0 {
        FederationPhase::Running
    } else {
        FederationPhase::Pending
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: None,
    }
}

fn ready(input: &StatusInput, summaries: &[NodeSummary]) -> Condition {
    if let Some(first) = input.problems.first() {
        let message = input
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return condition(READY, "False", first.reason(), message);
    }
    let created = summaries
        .iter()
        .filter(|s| {
            input
                .pods
                .iter()
                .any(|p| p.labels().get(LABEL_NODE) == Some(&s.name))
        })
        .count();
    condition(
        READY,
        "True",
        "MembersCreated",
        format!("{created} of {} member pods exist", summaries.len()),
    )
}

fn configuration_current(input: &StatusInput) -> Condition {
    match input.drift {
        None => condition(
            CONFIGURATION_CURRENT,
            "Unknown",
            "SpecInvalid",
            "the current spec does not validate, so it cannot be compared with the running \
             configuration"
                .into(),
        ),
        Some(d) if d.is_empty() => condition(
            CONFIGURATION_CURRENT,
            "True",
            "UpToDate",
            "the running nodes use the current spec. Labels and annotations apply live; \
             changes to either spec need a new run"
                .into(),
        ),
        Some(d) => condition(
            CONFIGURATION_CURRENT,
            "False",
            "NewRunRequired",
            format!(
                "changed since the run started: {}. Running nodes keep their configuration \
                 and deleted pods come back with it; delete and re-create the \
                 FederationRound to run with the new spec",
                d.describe()
            ),
        ),
    }
}
