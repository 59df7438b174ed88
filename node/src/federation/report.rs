//! What a federation run reports: the events nodes print, and the files written from them
//! (`report.json`, `report.csv`, `accuracy.png`, `loss.png`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One node's figures for one round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub node: String,
    pub round: u64,
    pub train_loss: f64,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub learning_rate: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub peers_connected: usize,
    pub updates_received: u64,
    pub updates_used: u64,
    pub updates_dropped: u64,
    #[serde(default)]
    pub dropped_by_reason: BTreeMap<String, u64>,
    pub round_seconds: f64,
    pub training_seconds: f64,
    /// Sending, waiting for and receiving neighbours' updates.
    pub waiting_seconds: f64,
    /// Evaluation on the test split, in rounds where it is due.
    #[serde(default)]
    pub evaluation_seconds: f64,
    pub consensus_distance: Option<f64>,
}

/// A line a node prints on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeEvent {
    Started {
        node: String,
        round: u64,
        train_samples: usize,
        fingerprint: String,
        exchange_partners: Vec<String>,
    },
    Round(RoundRecord),
    PeerConnected {
        node: String,
        peer: String,
        round: u64,
    },
    PeerDisconnected {
        node: String,
        peer: String,
        round: u64,
    },
    Finished {
        node: String,
        round: u64,
    },
    /// The launcher's own note that a node process ended.
    Exited {
        node: String,
        code: Option<i32>,
    },
}

/// Everything seen during a run, in arrival order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub federation: String,
    pub rounds: Vec<RoundRecord>,
    pub events: Vec<NodeEvent>,
}

impl Report {
    pub fn record(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Round(r) => self.rounds.push(r),
            other => self.events.push(other),
        }
    }

    /// Mean and minimum of the last evaluated accuracy at or before `round`, over `nodes`.
    pub fn accuracy_at(&self, nodes: &[String], round: u64) -> Option<(f64, f64)> {
        let accs: Vec<f64> = nodes
            .iter()
            .filter_map(|n| {
                self.rounds
                    .iter()
                    .filter(|r| &r.node == n && r.round <= round)
                    .filter_map(|r| r.test_accuracy.map(|a| (r.round, a)))
                    .max_by_key(|(round, _)| *round)
                    .map(|(_, a)| a)
            })
            .collect();
        if accs.len() != nodes.len() || accs.is_empty() {
            return None;
        }
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        Some((mean, accs.iter().copied().fold(f64::INFINITY, f64::min)))
    }

    /// Writes `report.json`, `report.csv` and the plots into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        write_atomically(&dir.join("report.json"), json.as_bytes())?;
        write_atomically(&dir.join("report.csv"), self.csv().as_bytes())?;
        self.plot(&dir.join("accuracy.png"), "test accuracy", |r| {
            r.test_accuracy
        })?;
        self.plot(&dir.join("loss.png"), "train loss", |r| Some(r.train_loss))?;
        Ok(())
    }

    fn csv(&self) -> String {
        let mut out = String::from(
            "node,round,train_loss,test_accuracy,test_loss,learning_rate,bytes_sent,\
             bytes_received,peers_connected,updates_received,updates_used,updates_dropped,\
             round_seconds,training_seconds,waiting_seconds,evaluation_seconds,\
             consensus_distance\n",
        );
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        for r in &self.rounds {
            out.push_str(&format!(
                "{},{},{:.6},{},{},{:.3e},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{}\n",
                r.node,
                r.round,
                r.train_loss,
                opt(r.test_accuracy),
                opt(r.test_loss),
                r.learning_rate,
                r.bytes_sent,
                r.bytes_received,
                r.peers_connected,
                r.updates_received,
                r.updates_used,
                r.updates_dropped,
                r.round_seconds,
                r.training_seconds,
                r.waiting_seconds,
                r.evaluation_seconds,
                opt(r.consensus_distance),
            ));
        }
        out
    }

    /// One line per node against rounds; disconnections (red) and reconnections (green)
    /// seen by any node are marked as short ticks along the bottom axis.
    fn plot(
        &self,
        path: &Path,
        label: &str,
        value: impl Fn(&RoundRecord) -> Option<f64>,
    ) -> anyhow::Result<()> {
        register_font();
        let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for r in &self.rounds {
            if let Some(v) = value(r) {
                series.entry(&r.node).or_default().push((r.round as f64, v));
            }
        }
        let max_round = self
            .rounds
            .iter()
            .map(|r| r.round)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let (lo, hi) = series
            .values()
            .flatten()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, v)| {
                (lo.min(*v), hi.max(*v))
            });
        let (lo, hi) = if lo.is_finite() {
            (lo.min(0.0), hi.max(lo + 1e-3))
        } else {
            (0.0, 1.0)
        };

        let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{} — {label}", self.federation), ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_round, lo..hi * 1.05)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(label)
            .draw()
            .map_err(plot_error)?;
        for (i, (node, points)) in series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(plot_error)?
                .label(*node)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        let tick = (hi - lo) * 0.04;
        for event in &self.events {
            let (round, colour) = match event {
                // Nodes leaving after the last round is the run ending, not a fault.
                NodeEvent::PeerDisconnected { round, .. } if (*round as f64) < max_round => {
                    (*round, RED)
                }
                NodeEvent::PeerConnected { round, .. } if *round > 1 => (*round, GREEN),
                _ => continue,
            };
            let x = round as f64;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, lo), (x, lo + tick)],
                    colour.stroke_width(3),
                )))
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
        Ok(())
    }
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing plot: {e}")
}

/// Plot text needs a font; one ships inside the binary so that plots render on hosts
/// without any installed fonts.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
