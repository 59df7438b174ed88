//! `edgesync-operator run`: serve metrics, win the leader election, run both controllers,
//! and on SIGTERM let in-flight reconciliations finish, release the Lease and exit.

use std::sync::Arc;
use std::time::Duration;

use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::context::Context;
use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::settings::RunArgs;
use crate::{dflnode, federation, web, Error};

/// How long in-flight reconciliations may take to finish after a stop is requested; well
/// inside the 30 s a pod gets between SIGTERM and SIGKILL by default.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// An API over one namespace, or over all of them.
pub fn api<K>(client: &Client, namespace: Option<String>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), &ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the operator until SIGTERM or SIGINT, or until it loses the leader Lease.
pub async fn run(args: RunArgs) -> Result<(), Error> {
    args.pods.check()?;
    let metrics = Arc::new(Metrics::new()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    spawn_signal_handler(stop_tx.clone())?;

    let listener = web::bind(args.metrics_addr).await?;
    let web = tokio::spawn(web::serve(listener, metrics.clone(), stop_rx.clone()));

    let client = Client::try_default().await?;
    let identity = args
        .leader
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "edgesync-operator".into());
    let elector = args.leader.leader_election.then(|| {
        Elector::new(
            client.clone(),
            &args.leader.lease_namespace,
            &args.leader.lease_name,
            &identity,
            args.leader.lease_seconds,
        )
    });
    if let Some(elector) = &elector {
        if !elector.acquire(&mut stop_rx.clone()).await {
            info!("stopped before leading");
            let _ = web.await;
            return Ok(());
        }
    }

    let ctx = Arc::new(Context::new(client, args.pods, metrics, Some(identity)));
    let mut controllers = tokio::spawn({
        let (ctx, ns) = (ctx.clone(), args.namespace.clone());
        let (a, b) = (stopped(stop_rx.clone()), stopped(stop_rx.clone()));
        async move {
            tokio::join!(
                federation::run_controller(ctx.clone(), ns.clone(), a),
                dflnode::run_controller(ctx, ns, b),
            );
        }
    });
    info!(
        namespace = args.namespace.as_deref().unwrap_or("*"),
        "controllers started"
    );

    let lease_lost = match &elector {
        Some(elector) => elector.keep(&mut stop_rx.clone()).await.err(),
        None => {
            let _ = stop_rx.clone().wait_for(|s| *s).await;
            None
        }
    };
    if let Some(error) = &lease_lost {
        warn!(%error, "stopping controllers");
        let _ = stop_tx.send(true);
    }
    // Reconciliations in flight get a bounded time to finish. The bound matters when the
    // API server is unreachable: the controllers then never become ready and would wait
    // for it forever.
    let joined = match tokio::time::timeout(SHUTDOWN_GRACE, &mut controllers).await {
        Ok(joined) => joined,
        Err(_) => {
            warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "controllers did not stop in time; abandoning them"
            );
            controllers.abort();
            Ok(())
        }
    };
    if let Some(elector) = &elector {
        if lease_lost.is_none() {
            elector.release().await;
        }
    }
    let _ = web.await;
    info!("stopped");
    if let Some(error) = lease_lost {
        return Err(error);
    }
    joined.map_err(|e| Error::Task(e.to_string()))
}

/// Resolves once a stop is requested.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn spawn_signal_handler(stop: Arc<watch::Sender<bool>>) -> Result<(), Error> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Signal("SIGINT", e))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "stopping"),
            _ = int.recv() => info!(signal = "SIGINT", "stopping"),
        }
        let _ = stop.send(true);
    });
    Ok(())
}
