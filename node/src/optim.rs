//! Optimisers and the learning-rate schedule.
//!
//! tch's built-in optimisers keep their state inside libtorch where it cannot be read out,
//! and a node must checkpoint that state to resume exactly where it stopped. These are
//! written over plain tensor operations instead; the per-step cost is a handful of
//! element-wise passes over the parameters, small next to a CNN's forward and backward.

use std::collections::HashMap;
use std::f64::consts::PI;

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

/// Which update rule to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay (AdamW).
    Adam,
    /// Stochastic gradient descent with heavy-ball momentum and L2 weight decay.
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// SGD momentum; Adam's first-moment decay.
    pub momentum: f64,
    /// Rescale gradients whose global L2 norm exceeds this.
    pub clip_grad_norm: Option<f64>,
}

const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

/// Cosine decay from the base rate to `min_fraction` of it over `total_steps`, after a
/// linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub base: f64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub min_fraction: f64,
}

impl CosineSchedule {
    pub fn rate(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let floor = self.base * self.min_fraction;
        floor + 0.5 * (self.base - floor) * (1.0 + (PI * progress).cos())
    }
}

/// One parameter and its optimiser buffers.
struct Slot {
    name: String,
    param: Tensor,
    /// Adam's first moment, or SGD's momentum buffer.
    first: Tensor,
    /// Adam's second moment.
    second: Option<Tensor>,
}

pub struct Optimizer {
    config: OptimizerConfig,
    slots: Vec<Slot>,
    step: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer state is missing {0}")]
    MissingState(String),
    #[error("optimizer state {name} has shape {found:?}, parameter has {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
}

impl Optimizer {
    /// Tracks every trainable variable of `vs`, in name order.
    pub fn new(vs: &nn::VarStore, config: OptimizerConfig) -> Optimizer {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, param)| Slot {
                first: param.zeros_like(),
                second: (config.kind == OptimizerKind::Adam).then(|| param.zeros_like()),
                name,
                param,
            })
            .collect();
        Optimizer {
            config,
            slots,
            step: 0,
        }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// Clips gradients if configured, then updates every parameter at learning rate `lr`.
    /// Returns the global gradient norm before clipping.
    pub fn step(&mut self, lr: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
        let norm = global_norm(&grads);
        if let Some(max) = self.config.clip_grad_norm {
            if norm > max {
                let scale = max / (norm + 1e-6);
                for g in grads.iter().filter(|g| g.defined()) {
                    let _ = g.shallow_clone().g_mul_scalar_(scale);
                }
            }
        }

        self.step += 1;
        let wd = self.config.weight_decay;
        let beta1 = self.config.momentum;
        for (slot, grad) in self.slots.iter_mut().zip(&grads) {
            if !grad.defined() {
                continue;
            }
            match self.config.kind {
                OptimizerKind::Adam => {
                    let bias1 = 1.0 - beta1.powi(self.step as i32);
                    let bias2 = 1.0 - ADAM_BETA2.powi(self.step as i32);
                    if wd > 0.0 {
                        let _ = slot.param.g_mul_scalar_(1.0 - lr * wd);
                    }
                    let _ = slot.first.lerp_(grad, 1.0 - beta1);
                    let second = slot.second.as_mut().expect("adam keeps a second moment");
                    let _ = second.g_mul_scalar_(ADAM_BETA2);
                    let _ = second.g_add_(&(grad.square() * (1.0 - ADAM_BETA2)));
                    let denom = (&*second / bias2).sqrt() + ADAM_EPS;
                    let _ = slot.param.g_add_(&(&slot.first / denom * (-lr / bias1)));
                }
                OptimizerKind::Sgd => {
                    let update = if wd > 0.0 {
                        grad + &slot.param * wd
                    } else {
                        grad.shallow_clone()
                    };
                    let _ = slot.first.g_mul_scalar_(beta1);
                    let _ = slot.first.g_add_(&update);
                    let _ = slot.param.g_add_(&(&slot.first * -lr));
                }
            }
        }
        norm
    }

    /// Buffers to checkpoint, named `optimizer.<parameter>.<buffer>` in PyTorch's words.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for slot in &self.slots {
            let first = match self.config.kind {
                OptimizerKind::Adam => "exp_avg",
                OptimizerKind::Sgd => "momentum_buffer",
            };
            out.push((
                format!("optimizer.{}.{first}", slot.name),
                slot.first.contiguous(),
            ));
            if let Some(second) = &slot.second {
                out.push((
                    format!("optimizer.{}.exp_avg_sq", slot.name),
                    second.contiguous(),
                ));
            }
        }
        out
    }

    /// Restores buffers written by [`Optimizer::state`] and the step count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: u64,
    ) -> Result<(), OptimError> {
        let kind = self.config.kind;
        for slot in &mut self.slots {
            let first = match kind {
                OptimizerKind::Adam => "exp_avg",
                OptimizerKind::Sgd => "momentum_buffer",
            };
            copy_named(
                tensors,
                &format!("optimizer.{}.{first}", slot.name),
                &mut slot.first,
            )?;
            if let Some(second) = &mut slot.second {
                copy_named(
                    tensors,
                    &format!("optimizer.{}.exp_avg_sq", slot.name),
                    second,
                )?;
            }
        }
        self.step = step;
        Ok(())
    }
}

fn copy_named(
    tensors: &HashMap<String, Tensor>,
    name: &str,
    dst: &mut Tensor,
) -> Result<(), OptimError> {
    let src = tensors
        .get(name)
        .ok_or_else(|| OptimError::MissingState(name.to_string()))?;
    if src.size() != dst.size() {
        return Err(OptimError::ShapeMismatch {
            name: name.to_string(),
            found: src.size(),
            expected: dst.size(),
        });
    }
    tch::no_grad(|| dst.copy_(src));
    Ok(())
}

/// L2 norm of all tensors taken together, as if concatenated.
pub fn global_norm(tensors: &[Tensor]) -> f64 {
    tensors
        .iter()
        .filter(|t| t.defined())
        .map(|t| t.square().sum(tch::Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use tch::{nn::Module, Device, Kind};

    use super::*;

    fn config(kind: OptimizerKind) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            learning_rate: 0.1,
            weight_decay: 0.0,
            momentum: 0.9,
            clip_grad_norm: None,
        }
    }

    /// Fits y = 3x with a one-weight linear layer and returns the final weight.
    fn fit(kind: OptimizerKind, lr: f64) -> f64 {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let layer = nn::linear(
            vs.root() / "fc",
            1,
            1,
            nn::LinearConfig {
                bias: false,
                ..Default::default()
            },
        );
        let mut opt = Optimizer::new(&vs, config(kind));
        let xs = Tensor::linspace(-1.0, 1.0, 32, (Kind::Float, Device::Cpu)).view([32, 1]);
        let ys = &xs * 3.0;
        for _ in 0..300 {
            opt.zero_grad();
            let loss = (layer.forward(&xs) - &ys).square().mean(Kind::Float);
            loss.backward();
            opt.step(lr);
        }
        layer.ws.double_value(&[0, 0])
    }

    #[test]
    fn adam_and_sgd_fit_a_line() {
        assert!((fit(OptimizerKind::Adam, 0.05) - 3.0).abs() < 0.05);
        assert!((fit(OptimizerKind::Sgd, 0.1) - 3.0).abs() < 0.05);
    }

    #[test]
    fn clipping_bounds_the_applied_gradient() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[4], nn::Init::Const(0.0));
        let mut cfg = config(OptimizerKind::Sgd);
        cfg.momentum = 0.0;
        cfg.clip_grad_norm = Some(1.0);
        let mut opt = Optimizer::new(&vs, cfg);
        (&w * 100.0).sum(Kind::Float).backward();
        let norm = opt.step(1.0);
        assert!((norm - 200.0).abs() < 1e-3, "{norm}");
        // The step moved w by the clipped gradient: norm 1.
        let moved = w.square().sum(Kind::Float).sqrt().double_value(&[]);
        assert!((moved - 1.0).abs() < 1e-3, "{moved}");
    }

    #[test]
    fn state_round_trips() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], nn::Init::Const(1.0));
        let mut opt = Optimizer::new(&vs, config(OptimizerKind::Adam));
        w.sum(Kind::Float).backward();
        opt.step(0.01);
        let saved: HashMap<String, Tensor> = opt.state().into_iter().collect();
        assert!(saved.contains_key("optimizer.w.exp_avg_sq"));

        let mut fresh = Optimizer::new(&vs, config(OptimizerKind::Adam));
        fresh.load_state(&saved, opt.steps()).unwrap();
        assert_eq!(fresh.steps(), 1);
        let a = &fresh.state()[0].1;
        assert!(a.allclose(&saved["optimizer.w.exp_avg"], 0.0, 0.0, false));

        let empty = HashMap::new();
        assert!(fresh.load_state(&empty, 0).is_err());
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_floor() {
        let s = CosineSchedule {
            base: 1.0,
            total_steps: 110,
            warmup_steps: 10,
            min_fraction: 0.0,
        };
        assert!((s.rate(0) - 0.1).abs() < 1e-9);
        assert!((s.rate(10) - 1.0).abs() < 1e-9);
        assert!((s.rate(60) - 0.5).abs() < 1e-9);
        assert!(s.rate(110).abs() < 1e-9);
        assert!(s.rate(500).abs() < 1e-9);
    }
}
