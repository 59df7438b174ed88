//! Local training: a model, its optimiser and the node's own data, stepped batch by batch.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointError};
use crate::data::{Augment, Batcher, Dataset, Normalize};
use crate::eval::{self, EvalReport};
use crate::model::{self, Cnn, ModelSpec, SubNetwork};
use crate::optim::{CosineSchedule, OptimError, Optimizer, OptimizerConfig};

/// Weight of a narrower neighbour's sub-network in the training loss, beside the whole
/// network's weight of 1. The leading channels serve both networks, so the sub-network's
/// loss pulls them away from what the whole network alone would make of them; at equal
/// weight, the Jetson-class nodes of the grey-CIFAR testbed ended a point below their
/// accuracy without an Akida-class neighbour.
const SUB_NETWORK_LOSS_WEIGHT: f64 = 0.5;

/// How a node trains locally.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainConfig {
    pub batch_size: usize,
    pub local_steps: u64,
    pub rounds: u64,
    pub optimizer: OptimizerConfig,
    /// Linear learning-rate warm-up at the start of training, in steps.
    pub warmup_steps: u64,
    pub augment: bool,
    /// Seeds model initialisation, batch order and augmentation.
    pub seed: u64,
}

impl TrainConfig {
    pub fn total_steps(&self) -> u64 {
        self.rounds * self.local_steps
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optimizer(#[from] OptimError),
    #[error("checkpoint {path} was written for model {found}, this node runs {expected}")]
    WrongModel {
        path: String,
        found: String,
        expected: String,
    },
    #[error("checkpoint {path} lacks parameter {name}")]
    MissingParameter { path: String, name: String },
    #[error("training loss became {0}: lower the learning rate or enable gradient clipping")]
    Diverged(f64),
}

/// What a run of local steps did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    pub mean_loss: f64,
    pub samples: u64,
    pub seconds: f64,
}

/// A model with its optimiser, training on a node's local data.
pub struct Trainer {
    pub vs: nn::VarStore,
    pub model: Cnn,
    pub spec: ModelSpec,
    pub config: TrainConfig,
    pub device: Device,
    optimizer: Optimizer,
    schedule: CosineSchedule,
    batcher: Batcher,
    normalize: Normalize,
    channels_last: bool,
    train_len: usize,
    /// Leading channels also trained as a network of their own, for a narrower neighbour.
    sub_network: Option<SubNetwork>,
}

/// The batch sampler of a run that has taken `step` steps. A resumed run draws a fresh
/// order rather than repeating the batches it saw right after its start.
fn batcher_at(config: &TrainConfig, train_len: usize, step: u64) -> Batcher {
    let augment = config.augment.then(Augment::natural_images);
    let seed = config.seed ^ 0x5eed_ba7c ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    Batcher::new(
        train_len,
        config.batch_size,
        Normalize::default(),
        augment,
        seed,
    )
}

impl Trainer {
    /// Builds the model from `config.seed` (so every node given the same seed starts from
    /// the same weights) and prepares batching over `train_len` samples.
    pub fn new(spec: ModelSpec, config: TrainConfig, train_len: usize, device: Device) -> Self {
        tch::manual_seed(config.seed as i64);
        let vs = nn::VarStore::new(device);
        let model = Cnn::new(&vs.root(), spec);
        // Channels-last pays off for oneDNN on CPUs; cuDNN picks its own layouts.
        let channels_last = device == Device::Cpu;
        if channels_last {
            model::use_channels_last(&vs);
        }
        let optimizer = Optimizer::new(&vs, config.optimizer);
        let schedule = CosineSchedule {
            base: config.optimizer.learning_rate,
            total_steps: config.total_steps(),
            warmup_steps: config.warmup_steps,
            min_fraction: 0.01,
        };
        let batcher = batcher_at(&config, train_len, 0);
        Trainer {
            vs,
            model,
            spec,
            config,
            device,
            optimizer,
            schedule,
            batcher,
            normalize: Normalize::default(),
            channels_last,
            train_len,
            sub_network: None,
        }
    }

    pub fn fingerprint(&self) -> String {
        model::fingerprint(self.spec.architecture, &self.vs)
    }

    /// Optimiser steps taken so far (across restarts).
    pub fn steps(&self) -> u64 {
        self.optimizer.steps()
    }

    pub fn learning_rate(&self) -> f64 {
        self.schedule.rate(self.optimizer.steps())
    }

    /// Runs `steps` optimiser steps on batches of `data`. Blocking and CPU-heavy: async
    /// callers run it on a blocking thread.
    pub fn train_steps(&mut self, data: &Dataset, steps: u64) -> Result<StepStats, TrainError> {
        let start = Instant::now();
        let mut loss_sum = 0.0;
        for _ in 0..steps {
            let (mut inputs, labels) = self.batcher.next_batch(data, self.device);
            if self.channels_last {
                inputs = model::to_channels_last(&inputs);
            }
            self.optimizer.zero_grad();
            let loss = self
                .model
                .forward_t(&inputs, true)
                .cross_entropy_for_logits(&labels);
            match self.sub_network {
                Some(sub) => {
                    let sub_logits = self.model.forward_sub_network(&inputs, sub);
                    let sub_loss = sub_logits.cross_entropy_for_logits(&labels);
                    (&loss + sub_loss * SUB_NETWORK_LOSS_WEIGHT).backward();
                }
                None => loss.backward(),
            }
            let lr = self.schedule.rate(self.optimizer.steps());
            self.optimizer.step(lr);
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(TrainError::Diverged(value));
            }
            loss_sum += value;
        }
        Ok(StepStats {
            mean_loss: loss_sum / steps.max(1) as f64,
            samples: steps * self.config.batch_size.min(data.len()) as u64,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Also trains the leading channels as a network of their own from now on (see
    /// [`SubNetwork`]). Both losses are minimised together, the sub-network's at
    /// [`SUB_NETWORK_LOSS_WEIGHT`]; the reported loss stays the whole network's.
    pub fn train_sub_network(&mut self, sub: SubNetwork) {
        self.sub_network = Some(sub);
    }

    /// Re-estimates every batch norm's running statistics as their mean over `batches`
    /// batches of `data`, unaugmented as test images are, with the current weights.
    ///
    /// Evaluation and the Akida export normalise with the running statistics, which
    /// training last updated before the round's average moved the weights; where the
    /// average moves them far (an Akida-class model pulled toward its Jetson-class
    /// neighbours' channels), statistics of the old weights misjudge the new ones.
    pub fn recalibrate_batch_norm(&mut self, data: &Dataset, batches: usize) {
        let statistics: Vec<Tensor> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name.ends_with(".running_mean") || name.ends_with(".running_var"))
            .map(|(_, tensor)| tensor)
            .collect();
        let seed = self.config.seed ^ self.optimizer.steps();
        let mut batcher = Batcher::new(
            data.len(),
            self.config.batch_size,
            self.normalize,
            None,
            seed,
        );
        tch::no_grad(|| {
            for k in 0..batches {
                let before: Vec<Tensor> = statistics.iter().map(Tensor::copy).collect();
                let (mut inputs, _) = batcher.next_batch(data, self.device);
                if self.channels_last {
                    inputs = model::to_channels_last(&inputs);
                }
                let _ = self.model.forward_t(&inputs, true);

                // The pass moved each statistic a momentum's share of the way to this
                // batch's; stretching the move makes it the mean of the k + 1 batches so far
                // (the first batch's own statistics replace the stale ones outright).
                let stretch = 1.0 / (model::BATCH_NORM_MOMENTUM * (k + 1) as f64);
                for (statistic, old) in statistics.iter().zip(&before) {
                    let mean = (statistic - old) * stretch + old;
                    statistic.shallow_clone().copy_(&mean);
                }
            }
        });
    }

    pub fn evaluate(&self, data: &Dataset) -> EvalReport {
        eval::evaluate(
            &self.model,
            data,
            self.normalize,
            self.device,
            self.channels_last,
        )
    }

    /// Model parameters and buffers, by PyTorch-style name, in standard (NCHW) layout.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Everything a resumed run needs: parameters, optimiser state and `extra` tensors,
    /// with the step count and `metadata` alongside. `stall_halfway` is an injected fault
    /// (see [`checkpoint::save_stalling`]); `None` outside fault tests.
    pub fn save_checkpoint(
        &self,
        path: &Path,
        extra: Vec<(String, Tensor)>,
        mut metadata: BTreeMap<String, String>,
        stall_halfway: Option<std::time::Duration>,
    ) -> Result<(), TrainError> {
        let mut tensors: Vec<(String, Tensor)> = self
            .parameters()
            .into_iter()
            .map(|(n, t)| (n, t.contiguous()))
            .collect();
        tensors.extend(self.optimizer.state());
        tensors.extend(extra);
        metadata.insert("step".into(), self.optimizer.steps().to_string());
        metadata.insert(
            "architecture".into(),
            self.spec.architecture.as_str().into(),
        );
        metadata.insert("fingerprint".into(), self.fingerprint());
        checkpoint::save_stalling(path, &tensors, &metadata, stall_halfway)?;
        Ok(())
    }

    /// Restores parameters and optimiser state from `path`; returns the checkpoint so the
    /// caller can read its own tensors and metadata.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<checkpoint::Checkpoint, TrainError> {
        let ck = checkpoint::load(path)?;
        let found: String = ck.field("fingerprint")?;
        if found != self.fingerprint() {
            return Err(TrainError::WrongModel {
                path: path.display().to_string(),
                found,
                expected: self.fingerprint(),
            });
        }
        tch::no_grad(|| -> Result<(), TrainError> {
            for (name, mut var) in self.vs.variables() {
                let src = ck
                    .tensors
                    .get(&name)
                    .ok_or_else(|| TrainError::MissingParameter {
                        path: path.display().to_string(),
                        name: name.clone(),
                    })?;
                var.copy_(&src.to_kind(Kind::Float).to_device(self.device));
            }
            Ok(())
        })?;
        let step: u64 = ck.field("step")?;
        self.optimizer.load_state(&ck.tensors, step)?;
        self.batcher = batcher_at(&self.config, self.train_len, step);
        Ok(ck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;
    use crate::optim::OptimizerKind;

    #[test]
    fn recalibrated_statistics_describe_the_current_weights() {
        let images = Tensor::randint(256, [512, 3, 32, 32], (Kind::Uint8, Device::Cpu));
        let data = Dataset {
            images,
            labels: Tensor::zeros([512], (Kind::Int64, Device::Cpu)),
            classes: (0..10).map(|c| c.to_string()).collect(),
        };
        let spec = ModelSpec {
            architecture: Architecture::JetsonCnn,
            in_channels: 3,
            classes: 10,
        };
        let config = TrainConfig {
            batch_size: 64,
            local_steps: 1,
            rounds: 1,
            optimizer: OptimizerConfig {
                kind: OptimizerKind::Adam,
                learning_rate: 1e-3,
                weight_decay: 0.0,
                momentum: 0.9,
                clip_grad_norm: None,
            },
            warmup_steps: 0,
            augment: false,
            seed: 3,
        };
        let mut trainer = Trainer::new(spec, config, data.len(), Device::Cpu);
        trainer.train_steps(&data, 5).unwrap();

        // What the first batch norm should hold: the statistics of conv1's outputs over
        // the data, after the weights moved (as an average with neighbours moves them).
        let vars = trainer.vs.variables();
        tch::no_grad(|| {
            let _ = vars["conv1.weight"].shallow_clone().g_mul_scalar_(3.0);
        });
        let outputs = tch::no_grad(|| {
            trainer.normalize.apply(&data.images).conv2d(
                &vars["conv1.weight"],
                Some(&vars["conv1.bias"]),
                [1, 1],
                [1, 1],
                [1, 1],
                1,
            )
        });
        let dims = [0i64, 2, 3];
        let mean = outputs.mean_dim(&dims[..], false, Kind::Float);
        let var = outputs.var_dim(&dims[..], false, false);
        let off = |stats: &Tensor, want: &Tensor| (stats - want).abs().max().double_value(&[]);
        let scale = var.sqrt().max().double_value(&[]);
        assert!(
            off(&vars["bn1.running_var"], &var) > 0.5 * scale * scale,
            "stale statistics should be visibly off"
        );

        trainer.recalibrate_batch_norm(&data, 50);
        assert!(off(&vars["bn1.running_mean"], &mean) < 0.05 * scale);
        assert!(off(&vars["bn1.running_var"], &var) < 0.1 * scale * scale);
    }
}
