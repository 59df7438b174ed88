//! `dfl-node train` and `dfl-node data inspect` on the real data in ../shared/data.

mod common;

use std::process::Command;

use common::{dfl_node, shared_data};

fn train(args: &[&str]) -> std::process::Output {
    Command::new(dfl_node())
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn akida_model_learns_mnist_and_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data().join("mnist");
    let checkpoint = dir.path().join("node.safetensors");
    let report = dir.path().join("report.json");
    let common = [
        "--data",
        data.to_str().unwrap(),
        "--model",
        "akida-cnn",
        "--local-steps",
        "60",
        "--batch-size",
        "64",
        "--warmup-steps",
        "20",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];

    let out = train(&[&common[..], &["--rounds", "2"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("round    2/2"), "{stdout}");
    assert!(checkpoint.exists());

    // A longer run with the same checkpoint continues at round 3 instead of starting over.
    let out = train(&[&common[..], &["--rounds", "3"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("round    1/3") && stdout.contains("round    3/3"),
        "{stdout}"
    );

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let accuracy = summary["final"]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.9, "MNIST accuracy after 180 steps: {accuracy}");
    assert_eq!(summary["final"]["samples"], 2004);
    let confusion = summary["final"]["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
}

#[test]
fn checkpoints_use_pytorch_parameter_names() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data().join("mnist");
    let checkpoint = dir.path().join("node.safetensors");
    let out = train(&[
        "--data",
        data.to_str().unwrap(),
        "--model",
        "jetson-cnn",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--eval-limit",
        "100",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ck = edgesync_node::checkpoint::load(&checkpoint).unwrap();
    let conv = &ck.tensors["conv1.weight"];
    assert_eq!(conv.size(), vec![32, 1, 3, 3]);
    assert!(ck.tensors.contains_key("bn1.running_mean"));
    assert!(ck.tensors.contains_key("optimizer.fc2.weight.exp_avg"));
    assert_eq!(ck.metadata["round"], "1");
}

#[test]
fn missing_data_is_a_clear_error() {
    let out = train(&["--data", "/nonexistent/cifar", "--rounds", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/cifar"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn inspect_prints_the_partition_histogram_of_cifar10() {
    let data = shared_data().join("cifar10");
    let out = Command::new(dfl_node())
        .args(["data", "inspect", "--data"])
        .arg(&data)
        .args(["--nodes", "4", "--alpha", "1.0", "--min-per-node", "100"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("train: 50000 images, 3x32x32"), "{stdout}");
    assert!(stdout.contains("test: 10000 images"), "{stdout}");
    assert_eq!(stdout.matches("  node ").count(), 4, "{stdout}");
}
