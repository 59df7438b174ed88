//! The `DflNode` controller.
//!
//! A node process reports its own phase, round and accuracy into its `DflNode` status. What
//! it cannot report is a pod that never started or that died: a device nobody can schedule
//! on, an image that does not pull, a crash loop. This controller writes those phases from
//! the node's pods, and checks a `DflNode`'s spec on its own so that a mistake shows up as
//! an event on the device even before a federation selects it.
//!
//! Steps: observe the node's pods, validate the spec, build the phase to report, apply it
//! to the status subresource, and publish an event for a spec problem.

use std::sync::Arc;
use std::time::Instant;

use edgesync_api::{DflNode, NodePhase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, instrument, warn};

use crate::apply::params;
use crate::context::Context;
use crate::federation::status::pod_phase;
use crate::metrics::{DFL_NODE, INVALID_SPEC};
use crate::names::{LABEL_MANAGED_BY, LABEL_NODE, MANAGER};
use crate::operator::api;
use crate::validate::{self, Invalid};
use crate::Error;

/// The phase the operator should write for a node, if any: pods that are not running say
/// what the node cannot, and a running pod lifts a node out of `Pending` until the node
/// reports for itself. Pure.
pub fn reported_phase(pods: &[Pod], current: Option<NodePhase>) -> Option<NodePhase> {
    let phases: Vec<NodePhase> = pods.iter().map(|p| pod_phase(Some(p))).collect();
    if phases.is_empty() {
        return None;
    }
    let desired = if phases.contains(&NodePhase::Training) {
        if !matches!(current, None | Some(NodePhase::Pending)) {
            return None;
        }
        NodePhase::Training
    } else {
        // The newest pod speaks for the node.
        let newest = pods
            .iter()
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
        pod_phase(Some(newest))
    };
    (current != Some(desired)).then_some(desired)
}

/// Reconciles one `DflNode`, counting it in the metrics.
pub async fn reconcile(node: Arc<DflNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_steps(&node, &ctx).await;
    let failure = match &result {
        Ok(problems) if !problems.is_empty() => Some(INVALID_SPEC),
        Ok(_) => None,
        Err(e) => Some(e.category()),
    };
    ctx.metrics
        .observe(DFL_NODE, started.elapsed().as_secs_f64(), failure);
    result?;
    ctx.succeeded(&key(&node));
    // Pod changes trigger this controller; there is nothing to poll for.
    Ok(Action::await_change())
}

pub fn error_policy(node: Arc<DflNode>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_retry(&key(&node));
    warn!(node = %node.name_any(), %error, retry_in_s = delay.as_secs(), "reconciliation failed");
    Action::requeue(delay)
}

fn key(node: &DflNode) -> String {
    format!(
        "DflNode/{}/{}",
        node.namespace().unwrap_or_default(),
        node.name_any()
    )
}

/// The reconciliation steps; returns the spec problems found.
#[instrument(skip(node, ctx), fields(node = %node.name_any()))]
pub async fn reconcile_steps(node: &DflNode, ctx: &Context) -> Result<Vec<Invalid>, Error> {
    let namespace = node.namespace().ok_or(Error::Incomplete {
        kind: "DflNode",
        field: "metadata.namespace",
    })?;
    let name = node.name_any();

    // Resolve: the node's pods, in any federation.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!("{LABEL_NODE}={name},{LABEL_MANAGED_BY}={MANAGER}");
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;

    // Validate.
    let problems = validate::node_problems(node);

    // Build and apply the phase.
    let current = node.status.as_ref().and_then(|s| s.phase);
    if let Some(phase) = reported_phase(&pods, current) {
        let api: Api<DflNode> = Api::namespaced(ctx.client.clone(), &namespace);
        let body = serde_json::json!({
            "apiVersion": DflNode::api_version(&()),
            "kind": DflNode::kind(&()),
            "status": { "phase": phase },
        });
        api.patch_status(&name, &params(), &Patch::Apply(&body))
            .await?;
        debug!(?phase, "node phase written from its pod");
    }

    // Events.
    let key = key(node);
    if problems.is_empty() {
        ctx.forget_announcement(&key);
    } else {
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        if ctx.first_announcement(&key, &message) {
            let event = Event {
                type_: EventType::Warning,
                reason: problems[0].reason().into(),
                note: Some(message.chars().take(1000).collect()),
                action: "Validate".into(),
                secondary: None,
            };
            if let Err(error) = ctx.recorder.publish(&event, &node.object_ref(&())).await {
                warn!(%error, "could not publish event");
            }
        }
    }
    Ok(problems)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let managed = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    Controller::new(
        api::<DflNode>(&client, namespace.clone()),
        watcher::Config::default(),
    )
    .watches(api::<Pod>(&client, namespace), managed, |pod: Pod| {
        let node = pod.labels().get(LABEL_NODE).cloned();
        let namespace = pod.namespace();
        node.into_iter().map(move |n| {
            let r = ObjectRef::<DflNode>::new(&n);
            match &namespace {
                Some(ns) => r.within(ns),
                None => r,
            }
        })
    })
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(error) = result {
            debug!(%error, "controller event");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::chrono::{TimeDelta, Utc};

    use super::*;

    fn pod(phase: &str, age_s: i64, waiting: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.creation_timestamp = Some(Time(Utc::now() - TimeDelta::seconds(age_s)));
        pod.status = Some(PodStatus {
            phase: Some(phase.into()),
            container_statuses: waiting.map(|reason| {
                vec![ContainerStatus {
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(reason.into()),
                            message: None,
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]
            }),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn phases_the_node_cannot_report_come_from_its_pod() {
        assert_eq!(reported_phase(&[], None), None);
        let pending = [pod("Pending", 5, None)];
        assert_eq!(reported_phase(&pending, None), Some(NodePhase::Pending));
        assert_eq!(reported_phase(&pending, Some(NodePhase::Pending)), None);
        let pull = [pod("Pending", 5, Some("ImagePullBackOff"))];
        assert_eq!(reported_phase(&pull, None), Some(NodePhase::Failed));
        let crash = [pod("Running", 5, Some("CrashLoopBackOff"))];
        assert_eq!(
            reported_phase(&crash, Some(NodePhase::Training)),
            Some(NodePhase::Failed)
        );
        // The newest pod speaks for the node.
        let both = [pod("Failed", 100, None), pod("Succeeded", 5, None)];
        assert_eq!(reported_phase(&both, None), Some(NodePhase::Succeeded));
    }

    #[test]
    fn a_running_node_reports_for_itself() {
        let running = [pod("Running", 5, None)];
        assert_eq!(reported_phase(&running, None), Some(NodePhase::Training));
        assert_eq!(reported_phase(&running, Some(NodePhase::Training)), None);
        // What the node said about itself is not overwritten while it runs.
        assert_eq!(reported_phase(&running, Some(NodePhase::Succeeded)), None);
    }
}
