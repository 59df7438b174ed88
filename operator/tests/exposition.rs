//! The operator's `/metrics` as Prometheus scrapes it: both controllers' real reconcilers
//! record into the real registry, the operator's own web server serves it, and promtool's
//! linter reads it. Only the Kubernetes API server is mocked (a scripted `tower_test`
//! service, as in the other tests), because this machine has none.
//!
//! With `EDGESYNC_OPERATOR_METRICS_SERVE_SECONDS` set, the test goes on reconciling about
//! once a second and serving for that long, and writes the address it serves on into the
//! file `EDGESYNC_OPERATOR_METRICS_ADDR_FILE` names, so that a real Prometheus can scrape
//! an operator whose counters move (`scripts/check-prometheus.sh` does).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{json_of, lists, mk_federation, mk_node, mock_client, running_pod, started};
use common::{ApiServer, NODES, PODS, STATUS, WAIT};
use edgesync_operator::context::Context;
use edgesync_operator::metrics::Metrics;
use edgesync_operator::settings::NodePodSettings;
use edgesync_operator::{dflnode, federation, web};
use http::Method;
use tokio::sync::watch;

/// Runs `reconcile` with a fresh client whose API server follows `script`; the outcome of
/// the reconciliation itself only matters to the metrics.
async fn against<S, R>(metrics: &Arc<Metrics>, script: S, reconcile: R)
where
    S: FnOnce(ApiServer) -> futures::future::BoxFuture<'static, ()>,
    R: AsyncFnOnce(Arc<Context>),
{
    let (client, server) = mock_client();
    // A context per reconciliation, so each publishes its events afresh; the registry is
    // shared, as in the operator.
    let ctx = Arc::new(Context::new(
        client,
        NodePodSettings::default(),
        metrics.clone(),
        None,
    ));
    let server = tokio::spawn(script(server));
    tokio::time::timeout(WAIT, reconcile(ctx))
        .await
        .expect("reconciliation finished in time");
    tokio::time::timeout(WAIT, server)
        .await
        .expect("scenario finished in time")
        .expect("scenario passed");
}

/// One reconciliation of each outcome the metrics tell apart: per controller a success and
/// an invalid spec, and an API server error.
async fn reconcile_each_outcome(metrics: &Arc<Metrics>) {
    let federation_pass = async |ctx: Arc<Context>| {
        let _ = federation::reconcile(Arc::new(mk_federation("{kind: ring}")), ctx).await;
    };

    // A running federation: its status is aggregated.
    let run = started();
    let script = move |mut server: ApiServer| -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let pods = vec![running_pod("a", "Running"), running_pod("b", "Running")];
            lists(
                &mut server,
                json_of(&run.nodes),
                run.config_maps,
                run.secrets,
                pods,
            )
            .await;
            server.expect(Method::PATCH, STATUS).await.reply_status();
        })
    };
    against(metrics, script, federation_pass).await;

    // An Akida board asked to train the Jetson model: a condition and an event.
    let nodes = vec![
        mk_node("a", "jetson", "jetson-cnn"),
        mk_node("b", "akida", "jetson-cnn"),
    ];
    let script = move |mut server: ApiServer| -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            lists(&mut server, json_of(&nodes), vec![], vec![], vec![]).await;
            server.expect(Method::PATCH, STATUS).await.reply_status();
            server.expect_event().await;
        })
    };
    against(metrics, script, federation_pass).await;

    // The API server fails.
    let script = |mut server: ApiServer| -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move { server.expect(Method::GET, NODES).await.reply_error(503) })
    };
    against(metrics, script, federation_pass).await;

    for (hardware, model, invalid) in [
        ("jetson", "jetson-cnn", false),
        ("akida", "jetson-cnn", true),
    ] {
        let script = move |mut server: ApiServer| -> futures::future::BoxFuture<'static, ()> {
            Box::pin(async move {
                server.expect_list(PODS, "Pod", vec![]).await;
                if invalid {
                    server.expect_event().await;
                }
            })
        };
        let node = Arc::new(mk_node("b", hardware, model));
        let pass = async move |ctx: Arc<Context>| {
            let _ = dflnode::reconcile(node, ctx).await;
        };
        against(metrics, script, pass).await;
    }
}

/// The body of `GET /metrics`, through the operator's web server. A plain blocking client
/// (tokio's I/O helpers are not among the operator's features), kept off the runtime that
/// serves the request.
async fn scrape(addr: SocketAddr) -> String {
    let response = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(WAIT))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
    .await
    .expect("scrape task")
    .expect("scrape");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// Runs `promtool check metrics` on `text`, when promtool is installed.
fn promtool(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        println!("promtool not found: skipping the lint of the metrics exposition");
        return;
    };
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).expect("write to promtool");
    drop(stdin);
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn reconciliations_are_served_as_prometheus_metrics() {
    let metrics = Arc::new(Metrics::new().expect("registry"));
    let listener = web::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(web::serve(listener, metrics.clone(), stopped));

    reconcile_each_outcome(&metrics).await;
    let text = scrape(addr).await;
    let fed = r#"controller="federationround""#;
    let node = r#"controller="dflnode""#;
    for line in [
        format!("edgesync_operator_reconciles_total{{{fed}}} 3"),
        format!("edgesync_operator_reconciles_total{{{node}}} 2"),
        format!(r#"edgesync_operator_reconcile_failures_total{{{fed},reason="invalid_spec"}} 1"#),
        format!(r#"edgesync_operator_reconcile_failures_total{{{fed},reason="server_error"}} 1"#),
        format!(r#"edgesync_operator_reconcile_failures_total{{{node},reason="invalid_spec"}} 1"#),
        format!("edgesync_operator_reconcile_duration_seconds_count{{{node}}} 2"),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
    promtool(&text);

    let serve_for = std::env::var("EDGESYNC_OPERATOR_METRICS_SERVE_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    if let Some(seconds) = serve_for {
        if let Ok(path) = std::env::var("EDGESYNC_OPERATOR_METRICS_ADDR_FILE") {
            // Written whole and renamed into place, so a reader never sees half of it.
            let partial = format!("{path}.partial");
            std::fs::write(&partial, format!("{addr}\n")).expect("write address");
            std::fs::rename(&partial, &path).expect("publish address");
        }
        println!("serving operator metrics on http://{addr}/metrics for {seconds}s");
        let until = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            reconcile_each_outcome(&metrics).await;
        }
    }

    let _ = stop.send(true);
    server.await.expect("web server stopped");
}
