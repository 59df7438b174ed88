//! The node's HTTP endpoint: `/metrics` for Prometheus, `/healthz` (the process is alive)
//! and `/readyz` (data loaded, model built, listening and peered) for probes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::metrics::{MetricsError, NodeMetrics};

/// A connection that has not finished its request by then is closed, so a stuck client
/// cannot hold a slot for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more wait in the listen backlog. A scrape is one request.
const MAX_CONNECTIONS: usize = 16;

/// The running endpoint; stopping it waits for its task.
pub struct Server {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    pub addr: SocketAddr,
}

impl Server {
    /// Binds `addr` now, so a taken port fails the start rather than a later scrape.
    pub async fn start(
        addr: SocketAddr,
        metrics: Arc<NodeMetrics>,
    ) -> Result<Server, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, metrics, stopped));
        Ok(Server { stop, task, addr })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn serve(listener: TcpListener, metrics: Arc<NodeMetrics>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Running out of file descriptors fails every accept; pausing keeps that
                // from becoming a busy loop.
                tracing::warn!(%error, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            // One request per connection keeps the timeout a bound on the whole exchange.
            let connection = http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(REQUEST_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "metrics connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &NodeMetrics) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => {
            if metrics.readiness.is_ready() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        (&Method::GET, "/metrics") => match metrics.render() {
            Ok(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The status code and the body of a plain HTTP/1.0 GET.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, out)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let metrics = Arc::new(NodeMetrics::new("f", "n", "cpu", &[]).unwrap());
        let server = Server::start("127.0.0.1:0".parse().unwrap(), metrics.clone())
            .await
            .unwrap();
        let addr = server.addr;
        assert!(get(addr, "/healthz").await.0 == 200);
        assert!(get(addr, "/readyz").await.0 == 503);
        let r = &metrics.readiness;
        for flag in [&r.data_loaded, &r.model_built, &r.listening, &r.peered] {
            flag.store(true, Ordering::Relaxed);
        }
        assert!(get(addr, "/readyz").await.0 == 200);
        let (_, scrape) = get(addr, "/metrics").await;
        let labels = [("federation", "f"), ("node", "n")];
        assert_eq!(
            crate::metrics::tests::value(&scrape, "edgesync_round", &labels),
            Some(0.0),
            "{scrape}"
        );
        assert!(get(addr, "/nothing").await.0 == 404);
        server.stop().await;
    }
}
