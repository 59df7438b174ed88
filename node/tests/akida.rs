//! The Akida-class model end to end on real MNIST: quantisation-aware training, export,
//! the Rust integer engine, the `dfl-node akida` commands, and BrainChip's `akida` package
//! (installed by `scripts/akida/setup.sh`) running the export bit for bit like the engine.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use edgesync_node::akida::{self, export, export::Export};
use edgesync_node::data::{self, DatasetKind, DatasetSpec, Split};
use edgesync_node::model::{Architecture, ModelSpec};
use edgesync_node::optim::{OptimizerConfig, OptimizerKind};
use edgesync_node::train::{TrainConfig, Trainer};
use tch::Device;

const STEPS: u64 = 300;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn qat_model_runs_as_the_same_integer_model_in_rust_and_in_akida() {
    let spec = DatasetSpec {
        kind: DatasetKind::Mnist,
        path: common::shared_data().join("mnist"),
        grayscale: false,
        resize: None,
    };
    let train = data::load(&spec, Split::Train).unwrap();
    let test = data::load(&spec, Split::Test).unwrap();
    let model = ModelSpec {
        architecture: Architecture::AkidaCnn,
        in_channels: 1,
        classes: 10,
    };
    let config = TrainConfig {
        batch_size: 32,
        local_steps: STEPS,
        rounds: 1,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Adam,
            learning_rate: 2e-3,
            weight_decay: 5e-4,
            momentum: 0.9,
            clip_grad_norm: Some(5.0),
        },
        warmup_steps: 30,
        augment: false,
        seed: 7,
    };
    let mut trainer = Trainer::new(model, config, train.len(), Device::Cpu);
    trainer.train_steps(&train, STEPS).unwrap();

    let float = trainer.evaluate(&test).accuracy;
    let integer = akida::evaluate(&trainer, &test).unwrap();
    println!(
        "MNIST test ({} images) after {STEPS} steps: float QAT {:.2}%, integer engine {:.2}%",
        test.len(),
        float * 100.0,
        integer * 100.0
    );
    assert!(float > 0.85, "the QAT model did not learn: {float}");
    assert!(
        (float - integer).abs() <= 0.01,
        "integer engine {integer} is more than a point from the float QAT model {float}"
    );

    // The command line, from a checkpoint, gives the same export and the same accuracy.
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("node.safetensors");
    let meta = BTreeMap::from([("round".to_string(), "1".to_string())]);
    trainer
        .save_checkpoint(&checkpoint, Vec::new(), meta, None)
        .unwrap();
    let json = dir.path().join("model.json");
    run(Command::new(common::dfl_node())
        .args(["akida", "export", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--out")
        .arg(&json));
    let exported = Export::load(&json).unwrap();
    assert_eq!(
        exported,
        export::from_model(&trainer.model, 32, 32).unwrap(),
        "the checkpoint's export differs from the live model's"
    );
    let (images, potentials) = (dir.path().join("images.npy"), dir.path().join("pot.npy"));
    let printed = run(Command::new(common::dfl_node())
        .args(["akida", "eval", "--model"])
        .arg(&json)
        .arg("--data")
        .arg(&spec.path)
        .arg("--save-images")
        .arg(&images)
        .arg("--save-potentials")
        .arg(&potentials));
    let expected = format!(
        "accuracy {:.2}% on {} test images",
        integer * 100.0,
        test.len()
    );
    assert!(printed.contains(&expected), "{printed}");

    check_with_akida(&json, &images, &potentials, test.len());
}

/// Runs the export through the akida package and asserts every potential agrees.
fn check_with_akida(json: &Path, images: &Path, potentials: &Path, n: usize) {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/akida");
    let setup = Command::new("bash").arg(scripts.join("setup.sh")).output();
    let python = match setup {
        Ok(out) if out.status.success() => {
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            stdout.lines().last().unwrap_or_default().trim().to_string()
        }
        Ok(out) => {
            let reason = String::from_utf8_lossy(&out.stderr).to_string();
            let last = reason.lines().last().unwrap_or("no output").to_string();
            println!("SKIPPED: akida could not be installed by scripts/akida/setup.sh: {last}");
            return;
        }
        Err(e) => {
            println!("SKIPPED: cannot run bash for scripts/akida/setup.sh: {e}");
            return;
        }
    };
    let printed = run(Command::new(python)
        .arg(scripts.join("convert.py"))
        .arg(json)
        .arg("--check")
        .arg(images)
        .arg("--expect")
        .arg(potentials)
        .args(["--software", "--map-virtual"]));
    println!(
        "{}",
        printed
            .lines()
            .filter(|l| !l.starts_with("predictions:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for what in ["potentials", "predictions"] {
        let line = format!("{what} identical for {n}/{n} images");
        assert!(
            printed.contains(&line),
            "akida disagrees with the engine:\n{printed}"
        );
    }
    // The whole model maps onto the chip as one hardware sequence.
    assert!(
        printed.contains("sequences: HW/conv1-fc2(Hardware)"),
        "{printed}"
    );
}
