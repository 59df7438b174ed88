//! Helpers shared by the integration tests: real data from the project's shared folder and
//! small federation manifests over it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use edgesync_node::federation::launcher::{plan, LocalOptions, Plan};

/// The shared data folder beside the checkout.
pub fn shared_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

pub fn dfl_node() -> &'static str {
    env!("CARGO_BIN_EXE_dfl-node")
}

/// Settings of a small MNIST federation.
pub struct Federation<'a> {
    pub name: &'a str,
    pub nodes: usize,
    pub topology: &'a str,
    pub rounds: u64,
    pub local_steps: u64,
    pub compression: &'a str,
    /// Consensus step (gamma) of the aggregation.
    pub consensus_step: f64,
    pub deadline_seconds: f64,
    pub eval_every: u64,
}

impl Default for Federation<'_> {
    fn default() -> Self {
        Federation {
            name: "test",
            nodes: 3,
            topology: "{kind: fullMesh}",
            rounds: 6,
            local_steps: 15,
            compression: "{kind: none}",
            consensus_step: 1.0,
            deadline_seconds: 10.0,
            eval_every: 3,
        }
    }
}

impl Federation<'_> {
    /// Writes the manifest into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let data = shared_data().join("mnist");
        let mut text = format!(
            r#"
apiVersion: edgesync.dev/v1alpha1
kind: FederationRound
metadata: {{name: {name}}}
spec:
  rounds: {rounds}
  localSteps: {steps}
  batchSize: 32
  seed: 11
  optimizer: {{kind: adam, learningRate: 0.002, clipGradNorm: 5.0}}
  topology: {topology}
  exchange: {{roundDeadlineSeconds: {deadline}, compression: {compression}}}
  aggregation: {{consensusStep: {gamma}}}
  partition: {{kind: dirichlet, alpha: 0.2, minPerNode: 100}}
  evaluation: {{everyRounds: {eval_every}, testLimit: 600}}
  nodeSelector: {{matchLabels: {{fed: {name}}}}}
"#,
            name = self.name,
            rounds = self.rounds,
            steps = self.local_steps,
            topology = self.topology,
            deadline = self.deadline_seconds,
            compression = self.compression,
            gamma = self.consensus_step,
            eval_every = self.eval_every,
        );
        for i in 0..self.nodes {
            text.push_str(&format!(
                r#"---
apiVersion: edgesync.dev/v1alpha1
kind: DflNode
metadata: {{name: node-{i}, labels: {{fed: {name}}}}}
spec:
  hardware: cpu
  model: akida-cnn
  dataset: {{format: mnist, path: {data}}}
"#,
                name = self.name,
                data = data.display(),
            ));
        }
        let path = dir.join(format!("{}.yaml", self.name));
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Plans the local federation of `manifest` with its report folder in `dir/run` and one
/// libtorch thread per node, starting nothing: tests start the nodes themselves.
pub fn plan_in(manifest: PathBuf, dir: &Path) -> Plan {
    plan(&LocalOptions {
        manifest,
        report_dir: Some(dir.join("run")),
        resume: false,
        threads_per_node: Some(1),
    })
    .unwrap()
}
