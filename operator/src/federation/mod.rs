//! The `FederationRound` controller.
//!
//! A reconciliation runs five steps: [`observe`] what exists, [`validate`](crate::validate)
//! the spec, [`build`] the missing objects, apply them, and write the status. An invalid
//! spec is reported in a `Ready=False` condition and an event, and waits for a change; an
//! API error is retried with a growing delay.
//!
//! A run's configuration is fixed when it starts. Changing the spec of a running
//! federation does not touch its nodes (a node reads its configuration once, and members
//! must agree on it); the `ConfigurationCurrent` condition says what changed and that a new
//! run is needed. A pod that is deleted or evicted comes back with its original
//! configuration and resumes from its checkpoint.

pub mod build;
pub mod objects;
pub mod observe;
pub mod pod;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgesync_api::{Condition, DflNode, FederationRound};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::chrono::{SecondsFormat, Utc};
use kube::api::Patch;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, info, instrument, warn};

use crate::apply::{apply, params};
use crate::context::Context;
use crate::identity::Identity;
use crate::metrics::{FEDERATION_ROUND, INVALID_SPEC};
use crate::names::{LABEL_MANAGED_BY, MANAGER};
use crate::operator::api;
use crate::validate::{self, Invalid};
use crate::Error;

/// How often a healthy federation is looked at even when nothing changed.
const RESYNC: Duration = Duration::from_secs(600);
/// Events carry at most this many bytes of text.
const NOTE_LIMIT: usize = 1000;

/// What one reconciliation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub action: Action,
    /// Problems of the spec that were reported.
    pub problems: Vec<Invalid>,
    /// Member pods created.
    pub pods_created: usize,
}

/// Reconciles one `FederationRound`, counting it in the metrics.
pub async fn reconcile(fed: Arc<FederationRound>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_steps(&fed, &ctx).await;
    let failure = match &result {
        Ok(o) if !o.problems.is_empty() => Some(INVALID_SPEC),
        Ok(_) => None,
        Err(e) => Some(e.category()),
    };
    ctx.metrics
        .observe(FEDERATION_ROUND, started.elapsed().as_secs_f64(), failure);
    let outcome = result?;
    ctx.succeeded(&key(&fed));
    Ok(outcome.action)
}

/// Retries a failed reconciliation after a delay that grows with each failure in a row.
pub fn error_policy(fed: Arc<FederationRound>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_retry(&key(&fed));
    warn!(
        federation = %fed.name_any(),
        namespace = fed.namespace().unwrap_or_default(),
        %error,
        retry_in_s = delay.as_secs(),
        "reconciliation failed"
    );
    Action::requeue(delay)
}

fn key(fed: &FederationRound) -> String {
    format!(
        "FederationRound/{}/{}",
        fed.namespace().unwrap_or_default(),
        fed.name_any()
    )
}

/// The reconciliation steps, returning what was done.
#[instrument(skip(fed, ctx), fields(federation = %fed.name_any(), namespace))]
pub async fn reconcile_steps(fed: &FederationRound, ctx: &Context) -> Result<Outcome, Error> {
    let namespace = fed.namespace().ok_or(Error::Incomplete {
        kind: "FederationRound",
        field: "metadata.namespace",
    })?;
    tracing::Span::current().record("namespace", namespace.as_str());
    let owner = objects::owner_reference(fed)?;
    let fed_name = fed.name_any();

    // Resolve references.
    let observed = observe::observe(&ctx.client, fed, &namespace).await?;
    let (run, mut problems) = observe::run_of(&observed.config_maps);

    // Validate.
    let plan = validate::federation(fed, &observed.nodes);
    let sources = build::sources(&run, &fed.spec, plan.as_ref().ok());
    if let Err(p) = &plan {
        problems.extend(p.iter().cloned());
    }
    problems.extend(sources.problems.iter().cloned());
    let ids = build::identities(&fed_name, &observed, &run, &sources, Identity::generate)?;
    problems.extend(ids.problems.iter().cloned());

    // Build. A new run starts only from a spec without problems, all members at once.
    let starting = run.is_empty();
    let desired = if starting && !problems.is_empty() {
        build::Desired::default()
    } else {
        build::desired(&build::Inputs {
            fed,
            namespace: &namespace,
            owner: &owner,
            observed: &observed,
            run: &run,
            plan: plan.as_ref().ok(),
            sources: &sources,
            ids: &ids,
            settings: &ctx.settings,
        })?
    };

    // Apply.
    let pods_created = apply_desired(ctx, &namespace, &desired).await?;

    // Update status.
    let members: Vec<String> = if starting {
        sources.members.keys().cloned().collect()
    } else {
        run.members.iter().cloned().collect()
    };
    let pods = if pods_created > 0 {
        // Newly created pods count as existing for the Ready message.
        let mut pods = observed.pods.clone();
        pods.extend(
            desired
                .members
                .iter()
                .filter_map(|m| m.workload.as_ref().map(|w| w.pod.clone())),
        );
        pods
    } else {
        observed.pods.clone()
    };
    let previous: &[Condition] = fed.status.as_ref().map_or(&[], |s| &s.conditions);
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let new_status = status::build(&status::StatusInput {
        members: &members,
        nodes: &observed.nodes,
        pods: &pods,
        problems: &problems,
        drift: sources.drift.as_ref(),
        previous,
        now: &now,
    });
    if fed.status.as_ref() != Some(&new_status) {
        let api: Api<FederationRound> = Api::namespaced(ctx.client.clone(), &namespace);
        let body = serde_json::json!({
            "apiVersion": FederationRound::api_version(&()),
            "kind": FederationRound::kind(&()),
            "status": new_status,
        });
        api.patch_status(&fed_name, &params(), &Patch::Apply(&body))
            .await?;
    }
    publish_events(
        ctx,
        fed,
        previous,
        &new_status.conditions,
        pods_created,
        starting,
    )
    .await;

    let action = if problems.is_empty() {
        Action::requeue(RESYNC)
    } else {
        // Nothing changes until the spec or the nodes do, and those changes trigger a
        // reconciliation: retrying now would only repeat the same report.
        Action::await_change()
    };
    Ok(Outcome {
        action,
        problems,
        pods_created,
    })
}

/// Writes the desired objects: the Service, then every Secret and ConfigMap (which pods
/// mount), then each member's account and pod. Returns the number of pods created.
async fn apply_desired(
    ctx: &Context,
    namespace: &str,
    desired: &build::Desired,
) -> Result<usize, Error> {
    let client = &ctx.client;
    if let Some(service) = &desired.service {
        apply(client, namespace, service).await?;
    }
    for m in &desired.members {
        if let Some(secret) = &m.secret {
            apply(client, namespace, secret).await?;
        }
    }
    for m in &desired.members {
        if let Some(cm) = &m.config_map {
            apply(client, namespace, cm).await?;
        }
    }
    let mut created = 0;
    for m in &desired.members {
        if let Some(w) = &m.workload {
            apply(client, namespace, &w.account).await?;
            apply(client, namespace, &w.role).await?;
            apply(client, namespace, &w.binding).await?;
            apply(client, namespace, &w.pod).await?;
            info!(node = %m.name, pod = %w.pod.name_any(), "member pod created");
            created += 1;
        }
    }
    Ok(created)
}

/// Events for what people should notice: a run started, pods recreated, and the `Ready`
/// condition turning false. Publishing is best effort: a lost event is logged, and never
/// fails the reconciliation.
async fn publish_events(
    ctx: &Context,
    fed: &FederationRound,
    previous: &[Condition],
    current: &[Condition],
    pods_created: usize,
    starting: bool,
) {
    let mut events = Vec::new();
    let ready = |conditions: &[Condition]| {
        conditions
            .iter()
            .find(|c| c.type_ == status::READY)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    if let Some((state, reason, message)) = ready(current) {
        if state == "False" && ready(previous) != ready(current) {
            events.push(Event {
                type_: EventType::Warning,
                reason,
                note: Some(truncate(&message)),
                action: "Validate".into(),
                secondary: None,
            });
        }
    }
    if pods_created > 0 {
        let (reason, note) = if starting {
            ("RunStarted", format!("created {pods_created} member pods"))
        } else {
            (
                "PodsRecreated",
                format!("recreated {pods_created} member pods with their original configuration"),
            )
        };
        events.push(Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    let reference = fed.object_ref(&());
    for event in events {
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(%error, reason = %event.reason, "could not publish event");
        }
    }
}

fn truncate(text: &str) -> String {
    if text.len() <= NOTE_LIMIT {
        return text.to_string();
    }
    let mut end = NOTE_LIMIT - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Runs the controller until `shutdown` resolves, then lets running reconciliations finish.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let managed = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let controller = Controller::new(
        api::<FederationRound>(&client, namespace.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    controller
        .owns(api::<Pod>(&client, namespace.clone()), managed.clone())
        .owns(
            api::<ConfigMap>(&client, namespace.clone()),
            managed.clone(),
        )
        .owns(api::<Service>(&client, namespace.clone()), managed)
        .watches(
            api::<DflNode>(&client, namespace.clone()),
            watcher::Config::default(),
            move |node: DflNode| {
                // A node's labels and status concern every federation that selects it.
                let namespace = node.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|f| {
                        f.namespace() == namespace && f.spec.node_selector.matches(node.labels())
                    })
                    .map(|f| ObjectRef::from_obj(&*f))
                    .collect::<Vec<_>>()
            },
        )
        // Nodes report every round; a short debounce folds a burst into one pass.
        .with_config(ControllerConfig::default().debounce(Duration::from_secs(1)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(federation = %object.name, "reconciled"),
                Err(error) => debug!(%error, "controller event"),
            }
        })
        .await;
}
