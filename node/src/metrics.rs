//! A node's Prometheus metrics, one struct per subsystem: training, exchange, convergence
//! and the process itself.
//!
//! Every series carries the federation and node names as constant labels of the registry,
//! so one Prometheus can scrape a whole federation (or several) without relabelling. Other
//! label values come from fixed sets: drop reasons from [`DROP_REASONS`], neighbour names
//! from the member list the node was started with. Nothing here exposes model data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every value of the `reason` label of `edgesync_updates_dropped_total`: the codec's
/// rejection reasons, plus the runner's own. A reason outside this list is counted as
/// `other`, so a new one can never grow the label set unnoticed.
pub const DROP_REASONS: &[&str] = &[
    // The update arrived but was older than the staleness bound when mixing.
    "stale",
    // The partner's update did not arrive before the round deadline.
    "deadline",
    // The frame named another sender than the peer that sent it.
    "sender",
    // A connection from a peer outside the member list was refused.
    "stranger",
    // The frame was from an earlier round than one already applied from its sender.
    "replayed",
    // Rejections by the codec (`DecodeError::reason`).
    "truncated",
    "magic",
    "version",
    "malformed",
    "too_large",
    "federation",
    "fingerprint",
    "shape",
    "non_finite",
    "other",
];

/// libtorch's version as found at build time, or the version tch requires.
pub const LIBTORCH_VERSION: &str = match option_env!("EDGESYNC_LIBTORCH_VERSION") {
    Some(v) => v,
    None => "2.13.0",
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Local training.
pub struct TrainingMetrics {
    pub round: IntGauge,
    pub train_loss: Gauge,
    pub test_accuracy: Gauge,
    pub test_loss: Gauge,
    pub samples: IntCounter,
    pub duration: Histogram,
}

impl TrainingMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = TrainingMetrics {
            round: IntGauge::new("round", "Round the node is training or last finished.")?,
            train_loss: Gauge::new("train_loss", "Mean local training loss of the last round.")?,
            test_accuracy: Gauge::new(
                "test_accuracy_ratio",
                "Accuracy on the node's test set at the last evaluation, from 0 to 1.",
            )?,
            test_loss: Gauge::new(
                "test_loss",
                "Loss on the node's test set at the last evaluation.",
            )?,
            samples: IntCounter::new(
                "samples_processed_total",
                "Training samples processed by local steps.",
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "local_training_duration_seconds",
                    "Time the local training steps of one round took.",
                )
                .buckets(SECONDS_BUCKETS.to_vec()),
            )?,
        };
        registry.register(Box::new(m.round.clone()))?;
        registry.register(Box::new(m.train_loss.clone()))?;
        registry.register(Box::new(m.test_accuracy.clone()))?;
        registry.register(Box::new(m.test_loss.clone()))?;
        registry.register(Box::new(m.samples.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        Ok(m)
    }
}

/// Exchange of updates with neighbours.
pub struct ExchangeMetrics {
    pub bytes_sent: IntCounter,
    pub bytes_received: IntCounter,
    pub updates_sent: IntCounter,
    pub updates_received: IntCounter,
    pub updates_used: IntCounter,
    dropped: IntCounterVec,
    pub round_duration: Histogram,
    pub waiting: Histogram,
    pub peers_connected: IntGauge,
    mixing_weight: GaugeVec,
    neighbour_connected: IntGaugeVec,
    connections: IntCounterVec,
    disconnections: IntCounterVec,
    /// Neighbours the per-neighbour series may name: the member list, fixed at start.
    neighbours: Vec<String>,
}

impl ExchangeMetrics {
    /// `neighbours` bounds the `neighbour` label: updates from anyone else are not graphed
    /// per neighbour.
    pub fn register(registry: &Registry, neighbours: &[String]) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let m = ExchangeMetrics {
            bytes_sent: counter("bytes_sent_total", "Update bytes delivered to neighbours.")?,
            bytes_received: counter("bytes_received_total", "Update bytes received.")?,
            updates_sent: counter("updates_sent_total", "Updates delivered to neighbours.")?,
            updates_received: counter("updates_received_total", "Updates received.")?,
            updates_used: counter("updates_used_total", "Neighbour estimates mixed in.")?,
            dropped: IntCounterVec::new(
                Opts::new("updates_dropped_total", "Updates not used, by reason."),
                &["reason"],
            )?,
            round_duration: Histogram::with_opts(
                HistogramOpts::new("round_duration_seconds", "Wall time of one whole round.")
                    .buckets(SECONDS_BUCKETS.to_vec()),
            )?,
            waiting: Histogram::with_opts(
                HistogramOpts::new(
                    "round_waiting_seconds",
                    "Part of a round spent sending and waiting for neighbours' updates.",
                )
                .buckets(SECONDS_BUCKETS.to_vec()),
            )?,
            peers_connected: IntGauge::new("peers_connected", "Members connected now.")?,
            mixing_weight: GaugeVec::new(
                Opts::new(
                    "mixing_weight",
                    "Metropolis-Hastings weight given to each neighbour in the last mix.",
                ),
                &["neighbour"],
            )?,
            neighbour_connected: IntGaugeVec::new(
                Opts::new(
                    "neighbour_connected",
                    "Whether a neighbour is connected now (1 or 0).",
                ),
                &["neighbour"],
            )?,
            // Counters, not only the gauge above: a neighbour that drops and comes back
            // between two scrapes leaves the gauge unchanged but still counts here, which
            // is what the dashboard's disconnection annotations read.
            connections: IntCounterVec::new(
                Opts::new(
                    "neighbour_connections_total",
                    "Times a neighbour became connected after having no connection.",
                ),
                &["neighbour"],
            )?,
            disconnections: IntCounterVec::new(
                Opts::new(
                    "neighbour_disconnections_total",
                    "Times a neighbour's last connection closed.",
                ),
                &["neighbour"],
            )?,
            neighbours: neighbours.to_vec(),
        };
        // Series present from the start let rate() and alerts work before the first event.
        for reason in DROP_REASONS {
            m.dropped.with_label_values(&[reason]);
        }
        for n in neighbours {
            m.mixing_weight.with_label_values(&[n]);
            m.neighbour_connected.with_label_values(&[n]);
            m.connections.with_label_values(&[n]);
            m.disconnections.with_label_values(&[n]);
        }
        registry.register(Box::new(m.bytes_sent.clone()))?;
        registry.register(Box::new(m.bytes_received.clone()))?;
        registry.register(Box::new(m.updates_sent.clone()))?;
        registry.register(Box::new(m.updates_received.clone()))?;
        registry.register(Box::new(m.updates_used.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        registry.register(Box::new(m.round_duration.clone()))?;
        registry.register(Box::new(m.waiting.clone()))?;
        registry.register(Box::new(m.peers_connected.clone()))?;
        registry.register(Box::new(m.mixing_weight.clone()))?;
        registry.register(Box::new(m.neighbour_connected.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.disconnections.clone()))?;
        Ok(m)
    }

    /// Counts `count` updates dropped for `reason`.
    pub fn dropped(&self, reason: &str, count: u64) {
        let reason = if DROP_REASONS.contains(&reason) {
            reason
        } else {
            "other"
        };
        self.dropped.with_label_values(&[reason]).inc_by(count);
    }

    /// Records the last mix's weights; neighbours left out of it get 0.
    pub fn set_weights(&self, weights: &std::collections::BTreeMap<String, f64>) {
        for n in &self.neighbours {
            let w = weights.get(n).copied().unwrap_or(0.0);
            self.mixing_weight.with_label_values(&[n]).set(w);
        }
    }

    /// Records that `peer` is now connected or not; a change is also counted as a
    /// connection or disconnection. Peers outside the member list are not graphed.
    pub fn set_connected(&self, peer: &str, connected: bool) {
        if !self.neighbours.iter().any(|n| n == peer) {
            return;
        }
        let state = self.neighbour_connected.with_label_values(&[peer]);
        // Only changes count, so a repeated report cannot invent an event.
        if state.get() == i64::from(connected) {
            return;
        }
        state.set(i64::from(connected));
        let events = if connected {
            &self.connections
        } else {
            &self.disconnections
        };
        events.with_label_values(&[peer]).inc();
    }
}

/// How far the node's model is from its neighbours', and how much it moves.
pub struct ConvergenceMetrics {
    pub consensus_distance: Gauge,
    pub update_norm: Gauge,
}

impl ConvergenceMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = ConvergenceMetrics {
            consensus_distance: Gauge::new(
                "consensus_distance",
                "Mean L2 distance between the node's model and its neighbours' estimates.",
            )?,
            update_norm: Gauge::new(
                "update_norm",
                "L2 norm of the change the last round applied to the trainable parameters.",
            )?,
        };
        registry.register(Box::new(m.consensus_distance.clone()))?;
        registry.register(Box::new(m.update_norm.clone()))?;
        Ok(m)
    }
}

/// The process: what was built and how much memory it holds.
pub struct ProcessMetrics {
    resident: IntGauge,
}

impl ProcessMetrics {
    pub fn register(registry: &Registry, device: &str) -> Result<Self, prometheus::Error> {
        let info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; the labels say what runs."),
            &["version", "libtorch", "device"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), LIBTORCH_VERSION, device])
            .set(1);
        let resident = IntGauge::new("resident_memory_bytes", "Resident memory of the process.")?;
        registry.register(Box::new(info))?;
        registry.register(Box::new(resident.clone()))?;
        Ok(ProcessMetrics { resident })
    }

    /// Reads the resident set size now; kept as it was when /proc cannot be read.
    fn refresh(&self) {
        if let Some(bytes) = resident_bytes() {
            self.resident.set(bytes);
        }
    }
}

/// What `/readyz` answers from. The runner sets each step as it completes it.
#[derive(Debug, Default)]
pub struct Readiness {
    pub data_loaded: AtomicBool,
    pub model_built: AtomicBool,
    pub listening: AtomicBool,
    /// At least one exchange partner connected, or none by design.
    pub peered: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        [
            &self.data_loaded,
            &self.model_built,
            &self.listening,
            &self.peered,
        ]
        .iter()
        .all(|f| f.load(Ordering::Relaxed))
    }
}

/// Every metric of one node, in the registry it is served from.
pub struct NodeMetrics {
    registry: Registry,
    pub training: TrainingMetrics,
    pub exchange: ExchangeMetrics,
    pub convergence: ConvergenceMetrics,
    pub process: ProcessMetrics,
    pub readiness: Readiness,
}

impl NodeMetrics {
    pub fn new(
        federation: &str,
        node: &str,
        device: &str,
        neighbours: &[String],
    ) -> Result<NodeMetrics, MetricsError> {
        let labels = HashMap::from([
            ("federation".to_string(), federation.to_string()),
            ("node".to_string(), node.to_string()),
        ]);
        let registry = Registry::new_custom(Some("edgesync".into()), Some(labels))?;
        Ok(NodeMetrics {
            training: TrainingMetrics::register(&registry)?,
            exchange: ExchangeMetrics::register(&registry, neighbours)?,
            convergence: ConvergenceMetrics::register(&registry)?,
            process: ProcessMetrics::register(&registry, device)?,
            readiness: Readiness::default(),
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        self.process.refresh();
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

/// Round phases last from tens of milliseconds (a tiny model on a GPU) to minutes (a
/// Jetson waiting out a deadline).
const SECONDS_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Resident set size from /proc/self/statm (its second field, in pages).
fn resident_bytes() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = text.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()?;
    Some(pages * page as i64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn sample() -> NodeMetrics {
        let neighbours = vec!["node-1".to_string(), "node-2".to_string()];
        let m = NodeMetrics::new("fed-a", "node-0", "cpu", &neighbours).unwrap();
        m.training.round.set(3);
        m.training.train_loss.set(0.5);
        m.training.samples.inc_by(480);
        m.training.duration.observe(1.2);
        m.exchange.bytes_sent.inc_by(1000);
        m.exchange.dropped("stale", 1);
        m.exchange.dropped("not-a-reason", 2);
        m.exchange
            .set_weights(&BTreeMap::from([("node-1".to_string(), 0.25)]));
        m.exchange.set_connected("node-1", true);
        m.exchange.set_connected("node-2", true);
        m.exchange.set_connected("node-2", false);
        m.exchange.set_connected("node-2", false);
        m.exchange.set_connected("stranger", true);
        m.convergence.update_norm.set(0.1);
        m
    }

    /// The value of the sample of `name` carrying (at least) `labels`. The registry's
    /// constant labels come out in no fixed order, so labels are compared as a set.
    pub(crate) fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        text.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{')?;
            let pairs: Vec<&str> = rest.strip_suffix('}')?.split(',').collect();
            let all = labels
                .iter()
                .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()));
            (metric == name && all).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn series_are_named_and_labelled() {
        let text = sample().render().unwrap();
        let node = [("federation", "fed-a"), ("node", "node-0")];
        let with = |extra: (&'static str, &'static str)| [node[0], node[1], extra];
        type Labels<'a> = Vec<(&'a str, &'a str)>;
        let expected: Vec<(&str, Labels, f64)> = vec![
            ("edgesync_round", node.to_vec(), 3.0),
            ("edgesync_bytes_sent_total", node.to_vec(), 1000.0),
            ("edgesync_samples_processed_total", node.to_vec(), 480.0),
            (
                "edgesync_updates_dropped_total",
                with(("reason", "stale")).to_vec(),
                1.0,
            ),
            (
                "edgesync_updates_dropped_total",
                with(("reason", "other")).to_vec(),
                2.0,
            ),
            (
                "edgesync_updates_dropped_total",
                with(("reason", "deadline")).to_vec(),
                0.0,
            ),
            (
                "edgesync_mixing_weight",
                with(("neighbour", "node-1")).to_vec(),
                0.25,
            ),
            (
                "edgesync_mixing_weight",
                with(("neighbour", "node-2")).to_vec(),
                0.0,
            ),
            (
                "edgesync_neighbour_connected",
                with(("neighbour", "node-1")).to_vec(),
                1.0,
            ),
            (
                "edgesync_neighbour_connected",
                with(("neighbour", "node-2")).to_vec(),
                0.0,
            ),
            (
                "edgesync_neighbour_connections_total",
                with(("neighbour", "node-2")).to_vec(),
                1.0,
            ),
            (
                "edgesync_neighbour_disconnections_total",
                with(("neighbour", "node-2")).to_vec(),
                1.0,
            ),
            (
                "edgesync_neighbour_disconnections_total",
                with(("neighbour", "node-1")).to_vec(),
                0.0,
            ),
            (
                "edgesync_local_training_duration_seconds_count",
                node.to_vec(),
                1.0,
            ),
            ("edgesync_round_duration_seconds_count", node.to_vec(), 0.0),
            ("edgesync_round_waiting_seconds_count", node.to_vec(), 0.0),
            ("edgesync_update_norm", node.to_vec(), 0.1),
            (
                "edgesync_build_info",
                with(("libtorch", LIBTORCH_VERSION)).to_vec(),
                1.0,
            ),
            ("edgesync_build_info", with(("device", "cpu")).to_vec(), 1.0),
        ];
        for (name, labels, want) in expected {
            assert_eq!(
                value(&text, name, &labels),
                Some(want),
                "{name} {labels:?}\n{text}"
            );
        }
        for name in [
            "edgesync_peers_connected",
            "edgesync_consensus_distance",
            "edgesync_train_loss",
            "edgesync_test_accuracy_ratio",
            "edgesync_test_loss",
            "edgesync_bytes_received_total",
            "edgesync_updates_sent_total",
            "edgesync_updates_received_total",
            "edgesync_updates_used_total",
        ] {
            assert!(
                value(&text, name, &node).is_some(),
                "missing {name}\n{text}"
            );
        }
        let resident = value(&text, "edgesync_resident_memory_bytes", &node);
        assert!(
            resident.is_some_and(|b| b > 1e6),
            "resident memory {resident:?}"
        );
        assert!(
            !text.contains("neighbour=\"stranger\""),
            "label outside the member list\n{text}"
        );
    }

    /// promtool's linter checks names, units and types the way Prometheus users expect.
    #[test]
    fn promtool_accepts_the_exposition() {
        let text = sample().render().unwrap();
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
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn readiness_needs_every_step() {
        let r = Readiness::default();
        r.data_loaded.store(true, Ordering::Relaxed);
        r.model_built.store(true, Ordering::Relaxed);
        r.listening.store(true, Ordering::Relaxed);
        assert!(!r.is_ready());
        r.peered.store(true, Ordering::Relaxed);
        assert!(r.is_ready());
    }
}
