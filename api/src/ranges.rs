//! Numeric bounds of a `FederationRound` spec, checked where no API server does it: the
//! CRD schema carries the same bounds for clusters, but `dfl-node local` and a node reading
//! its configuration parse YAML directly.

use crate::{FederationRoundSpec, PartitionSpec};

/// A spec field holding a value outside its allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("spec.{field} is {value}; it must be {allowed}")]
pub struct OutOfRange {
    pub field: &'static str,
    pub value: String,
    pub allowed: &'static str,
}

impl FederationRoundSpec {
    /// Every field outside its bounds, in spec order; empty when all are in range.
    pub fn out_of_range(&self) -> Vec<OutOfRange> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, field: &'static str, value: String, allowed: &'static str| {
            if !ok {
                problems.push(OutOfRange {
                    field,
                    value,
                    allowed,
                });
            }
        };
        check(
            self.rounds >= 1,
            "rounds",
            self.rounds.to_string(),
            "at least 1",
        );
        let steps = self.local_steps;
        check(steps >= 1, "localSteps", steps.to_string(), "at least 1");
        let batch = self.batch_size;
        check(batch >= 1, "batchSize", batch.to_string(), "at least 1");

        let lr = self.optimizer.learning_rate;
        check(
            lr.is_finite() && lr >= 0.0,
            "optimizer.learningRate",
            lr.to_string(),
            "a finite number of at least 0",
        );
        if let Some(clip) = self.optimizer.clip_grad_norm {
            check(
                clip.is_finite() && clip > 0.0,
                "optimizer.clipGradNorm",
                clip.to_string(),
                "greater than 0",
            );
        }
        let beta = self.momentum.beta;
        check(
            (0.0..=0.999).contains(&beta),
            "momentum.beta",
            beta.to_string(),
            "from 0 to 0.999",
        );
        let gamma = self.aggregation.consensus_step;
        check(
            gamma > 0.0 && gamma <= 1.0,
            "aggregation.consensusStep",
            gamma.to_string(),
            "greater than 0 and at most 1",
        );

        let factor = self.aggregation.clip_factor;
        check(
            factor.is_finite() && factor > 0.0,
            "aggregation.clipFactor",
            factor.to_string(),
            "a finite number greater than 0",
        );

        let exchange = &self.exchange;
        let deadline = exchange.round_deadline_seconds;
        check(
            deadline.is_finite() && deadline >= 0.1,
            "exchange.roundDeadlineSeconds",
            deadline.to_string(),
            "a finite number of at least 0.1",
        );
        let fraction = exchange.compression.fraction;
        check(
            fraction > 0.0 && fraction <= 1.0,
            "exchange.compression.fraction",
            fraction.to_string(),
            "greater than 0 and at most 1",
        );
        let bits = exchange.compression.bits;
        check(
            (2..=8).contains(&bits),
            "exchange.compression.bits",
            bits.to_string(),
            "from 2 to 8",
        );

        if let PartitionSpec::Dirichlet { alpha, .. } = self.partition {
            check(
                alpha.is_finite() && alpha > 0.0,
                "partition.alpha",
                alpha.to_string(),
                "a finite number greater than 0",
            );
        }
        let every = self.evaluation.every_rounds;
        check(
            every >= 1,
            "evaluation.everyRounds",
            every.to_string(),
            "at least 1",
        );
        problems
    }
}
