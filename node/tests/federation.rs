//! A real federation of `dfl-node` processes on loopback, on real MNIST digits split
//! non-IID among the nodes.

mod common;

use std::process::Command;

use common::{dfl_node, Federation};
use edgesync_node::federation::report::Report;

fn run_local(manifest: &std::path::Path, report_dir: &std::path::Path) -> Report {
    let out = Command::new(dfl_node())
        .args(["local", "-f"])
        .arg(manifest)
        .arg("--report-dir")
        .arg(report_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dfl-node local failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(report_dir.join("report.json")).unwrap();
    serde_json::from_str(&json).unwrap()
}

fn nodes(report: &Report) -> Vec<String> {
    let mut names: Vec<String> = report.rounds.iter().map(|r| r.node.clone()).collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn federated_nodes_beat_training_alone_and_approach_consensus() {
    let dir = tempfile::tempdir().unwrap();
    let rounds = 6;
    let alone = Federation {
        name: "alone",
        topology: "{kind: isolated}",
        rounds,
        ..Default::default()
    };
    let together = Federation {
        name: "together",
        rounds,
        ..Default::default()
    };
    let solo = run_local(&alone.write(dir.path()), &dir.path().join("alone"));
    let fed = run_local(&together.write(dir.path()), &dir.path().join("together"));

    let names = nodes(&fed);
    assert_eq!(names.len(), 3);
    let (solo_mean, _) = solo.accuracy_at(&names, rounds).unwrap();
    let (fed_mean, fed_min) = fed.accuracy_at(&names, rounds).unwrap();
    // Each node holds a skewed share of the digits (Dirichlet 0.2): alone it cannot learn
    // the classes it barely sees; federated, every node learns all of them.
    assert!(
        fed_mean > solo_mean + 0.10,
        "federated {fed_mean:.3} vs alone {solo_mean:.3}"
    );
    assert!(fed_min > 0.6, "weakest federated node at {fed_min:.3}");

    for node in &names {
        let rows: Vec<_> = fed.rounds.iter().filter(|r| &r.node == node).collect();
        assert_eq!(rows.len() as u64, rounds, "{node} completed every round");
        assert!(
            rows.iter().all(|r| r.updates_used == 2),
            "{node} used both neighbours"
        );
        assert!(rows
            .iter()
            .all(|r| r.bytes_sent > 0 && r.bytes_received > 0));
        let first = rows[0].consensus_distance.unwrap();
        let last = rows.last().unwrap().consensus_distance.unwrap();
        assert!(last < first, "{node}: consensus distance {first} -> {last}");
    }
    for file in ["report.csv", "accuracy.png", "loss.png"] {
        assert!(
            dir.path().join("together").join(file).exists(),
            "{file} missing"
        );
    }
}

#[test]
fn compressed_exchange_sends_far_fewer_bytes_and_still_learns() {
    let dir = tempfile::tempdir().unwrap();
    let dense = Federation {
        name: "dense",
        rounds: 10,
        eval_every: 10,
        ..Default::default()
    };
    let sparse = Federation {
        name: "sparse",
        rounds: 10,
        eval_every: 10,
        compression: "{kind: topK, fraction: 0.1}",
        // Compressed gossip needs a consensus step below 1 to stay stable.
        consensus_step: 0.5,
        ..Default::default()
    };
    let dense = run_local(&dense.write(dir.path()), &dir.path().join("dense"));
    let sparse = run_local(&sparse.write(dir.path()), &dir.path().join("sparse"));
    let sent = |r: &Report| r.rounds.iter().map(|r| r.bytes_sent).sum::<u64>() as f64;
    let ratio = sent(&dense) / sent(&sparse);
    assert!(ratio > 8.0, "top-k 10% sent only {ratio:.1}x fewer bytes");
    let names = nodes(&sparse);
    let (mean, _) = sparse.accuracy_at(&names, 10).unwrap();
    assert!(mean > 0.7, "compressed federation reached {mean:.3}");
}

#[test]
fn a_bad_manifest_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = Federation {
        topology: "{kind: star}",
        ..Default::default()
    }
    .write(dir.path());
    let out = Command::new(dfl_node())
        .args(["local", "-f"])
        .arg(&path)
        .arg("--report-dir")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.topology") && err.contains("star"),
        "{err}"
    );
}
