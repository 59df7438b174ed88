//! A running federation can be scraped: each node serves Prometheus metrics whose values
//! move as the rounds go by.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{dfl_node, Federation};

/// The launcher, interrupted (as Ctrl-C would) if the test fails before it finishes, so
/// that no node process outlives the test.
struct Launcher(Child);

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            use nix::sys::signal::{kill, Signal};
            use nix::unistd::Pid;
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGINT);
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A plain HTTP/1.0 GET: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// The value of the sample of `name` carrying (at least) `labels`, if the scrape has one.
/// Labels are compared as a set: their order in the exposition is not fixed.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{')?;
        let pairs: Vec<&str> = rest.strip_suffix('}')?.split(',').collect();
        let all = labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()));
        (metric == name && all).then(|| value.parse().ok())?
    })
}

/// Waits for `metrics.txt` and returns the address of `node`'s endpoint.
fn metrics_address(report_dir: &Path, node: &str) -> SocketAddr {
    let path = report_dir.join("metrics.txt");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let url = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{node} ")))
                .unwrap_or_else(|| panic!("{node} missing from metrics.txt:\n{text}"));
            let authority = url
                .strip_prefix("http://")
                .and_then(|u| u.strip_suffix("/metrics"))
                .unwrap_or_else(|| panic!("unexpected metrics URL {url}"));
            return authority.parse().unwrap();
        }
        assert!(Instant::now() < until, "metrics.txt never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_running_node_serves_metrics_that_move_with_the_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = Federation {
        name: "scraped",
        nodes: 2,
        rounds: 6,
        local_steps: 10,
        eval_every: 3,
        ..Default::default()
    }
    .write(dir.path());
    let report_dir = dir.path().join("run");
    let log = std::fs::File::create(dir.path().join("launcher.log")).unwrap();
    let mut launcher = Launcher(
        Command::new(dfl_node())
            .args(["local", "-f"])
            .arg(&manifest)
            .arg("--report-dir")
            .arg(&report_dir)
            .args(["--threads-per-node", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let addr = metrics_address(&report_dir, "node-0");
    let labels = [("federation", "scraped"), ("node", "node-0")];
    let until = Instant::now() + Duration::from_secs(240);
    let mut first: Option<f64> = None;
    let mut moved = None;
    while moved.is_none() {
        assert!(
            Instant::now() < until,
            "the round never advanced between scrapes (first {first:?})"
        );
        // Refused connections are expected until the node has started its endpoint.
        if let Ok((200, body)) = get(addr, "/metrics") {
            let round = sample(&body, "edgesync_round", &labels);
            let sent = sample(&body, "edgesync_bytes_sent_total", &labels);
            assert!(round.is_some() && sent.is_some(), "missing series:\n{body}");
            match (first, round) {
                (None, Some(_)) => first = round,
                (Some(f), Some(r)) if r > f => moved = Some((f, r)),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = get(addr, "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");

    let until = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = launcher.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < until, "the federation did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(dir.path().join("launcher.log")).unwrap_or_default();
    assert!(status.success(), "dfl-node local failed:\n{log}");
}
