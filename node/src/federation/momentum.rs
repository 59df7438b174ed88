//! Momentum applied to a node's round update (local training plus gossip correction).
//!
//! - `ema`: the node moves by an exponential moving average of its round updates,
//!   `v = beta v + (1 - beta) u`, `x = x_start + v`. This is the seed prototype's rule; it
//!   smooths noisy rounds but lags behind a steady trend.
//! - `quasiGlobal`: the node applies its round update in full and adds `beta v`, where `v`
//!   averages the same post-gossip updates. Because every update already includes the
//!   consensus step, `v` follows the federation's common direction rather than the node's
//!   own data, after quasi-global momentum (Lin et al., 2021), here applied once per round
//!   instead of inside every local step so that it composes with any local optimiser.
//!
//! Only trainable parameters take momentum; batch-norm statistics are left as they are.

use tch::Tensor;

use edgesync_api::MomentumKind as MomentumRule;

pub struct RoundMomentum {
    rule: MomentumRule,
    beta: f64,
    velocity: Vec<Tensor>,
}

impl RoundMomentum {
    /// `params` are the trainable parameters in the order later calls use.
    pub fn new(rule: MomentumRule, beta: f64, params: &[Tensor]) -> RoundMomentum {
        RoundMomentum {
            rule,
            beta,
            velocity: params.iter().map(|p| p.zeros_like()).collect(),
        }
    }

    /// Adjusts `params` in place, given their values at the start of the round.
    pub fn apply(&mut self, start: &[Tensor], params: &mut [Tensor]) {
        if self.rule == MomentumRule::None {
            return;
        }
        tch::no_grad(|| {
            for ((v, x0), x) in self.velocity.iter_mut().zip(start).zip(params.iter_mut()) {
                let update = &*x - x0;
                let _ = v.g_mul_scalar_(self.beta);
                let _ = v.g_add_(&(update * (1.0 - self.beta)));
                match self.rule {
                    MomentumRule::Ema => x.copy_(&(x0 + &*v)),
                    MomentumRule::QuasiGlobal => {
                        let _ = x.g_add_(&(&*v * self.beta));
                    }
                    MomentumRule::None => {}
                }
            }
        });
    }

    pub fn velocity(&self) -> &[Tensor] {
        &self.velocity
    }

    pub fn velocity_mut(&mut self) -> &mut [Tensor] {
        &mut self.velocity
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    fn step(rule: MomentumRule, rounds: usize) -> f64 {
        let mut x = vec![Tensor::zeros([1], (Kind::Float, Device::Cpu))];
        let mut m = RoundMomentum::new(rule, 0.5, &x);
        for _ in 0..rounds {
            let start: Vec<Tensor> = x.iter().map(|t| t.copy()).collect();
            let _ = x[0].g_add_scalar_(1.0); // every round's raw update is +1
            m.apply(&start, &mut x);
        }
        x[0].double_value(&[0])
    }

    #[test]
    fn rules_scale_a_steady_update_as_documented() {
        assert_eq!(step(MomentumRule::None, 3), 3.0);
        // EMA lags: 0.5 + 0.75 + 0.875.
        assert!((step(MomentumRule::Ema, 3) - 2.125).abs() < 1e-6);
        // Quasi-global adds beta v to each full update.
        let qg = step(MomentumRule::QuasiGlobal, 1);
        assert!((qg - 1.25).abs() < 1e-6, "{qg}");
    }
}
