//! How a federation divides a dataset among its nodes.
//!
//! Every node computes the whole partition from the federation's seed and keeps only its own
//! share, so no node ever needs to see another's data or a coordinator's list.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// How many fresh draws a Dirichlet split gets to give every node its minimum.
const MAX_ATTEMPTS: usize = 1000;

/// The rule that splits the data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Partition {
    /// Shuffle and deal out equal shares.
    Iid,
    /// Label skew: for each class, the share of each node is drawn from Dirichlet(alpha).
    /// Small alpha gives each node few classes; large alpha approaches IID.
    #[serde(rename_all = "camelCase")]
    Dirichlet { alpha: f64, min_per_node: usize },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    #[error("a partition needs at least one node")]
    NoNodes,
    #[error("dirichlet alpha must be a positive finite number, got {0}")]
    BadAlpha(f64),
    #[error("{samples} samples cannot give {nodes} nodes at least {min} each")]
    TooFewSamples {
        samples: usize,
        nodes: usize,
        min: usize,
    },
    #[error(
        "no dirichlet draw in {attempts} gave every node at least {min} samples; \
             lower minPerNode or raise alpha"
    )]
    MinimumNotReached { attempts: usize, min: usize },
}

/// Splits sample indices `0..labels.len()` over `nodes`, deterministically from `seed`.
/// Returns one sorted index list per node.
pub fn split(
    labels: &[i64],
    nodes: usize,
    partition: Partition,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if nodes == 0 {
        return Err(PartitionError::NoNodes);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut shares = match partition {
        Partition::Iid => iid(labels.len(), nodes, &mut rng),
        Partition::Dirichlet {
            alpha,
            min_per_node,
        } => dirichlet(labels, nodes, alpha, min_per_node, &mut rng)?,
    };
    for share in &mut shares {
        share.sort_unstable();
    }
    Ok(shares)
}

fn iid(len: usize, nodes: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(rng);
    let mut shares = vec![Vec::with_capacity(len / nodes + 1); nodes];
    for (i, sample) in order.into_iter().enumerate() {
        shares[i % nodes].push(sample);
    }
    shares
}

fn dirichlet(
    labels: &[i64],
    nodes: usize,
    alpha: f64,
    min_per_node: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::BadAlpha(alpha));
    }
    if labels.len() < nodes * min_per_node {
        return Err(PartitionError::TooFewSamples {
            samples: labels.len(),
            nodes,
            min: min_per_node,
        });
    }
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut by_class = vec![Vec::new(); classes];
    for (i, &label) in labels.iter().enumerate() {
        by_class[label as usize].push(i);
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::BadAlpha(alpha))?;

    for _ in 0..MAX_ATTEMPTS {
        let mut shares = vec![Vec::new(); nodes];
        for members in &by_class {
            let mut members = members.clone();
            members.shuffle(rng);
            // A Dirichlet draw is a vector of independent Gamma(alpha) draws, normalised.
            let draws: Vec<f64> = (0..nodes).map(|_| gamma.sample(rng)).collect();
            let total: f64 = draws.iter().sum::<f64>().max(f64::MIN_POSITIVE);
            let mut start = 0;
            let mut cumulative = 0.0;
            for (node, draw) in draws.iter().enumerate() {
                cumulative += draw / total;
                let end = if node + 1 == nodes {
                    members.len()
                } else {
                    ((cumulative * members.len() as f64).round() as usize).min(members.len())
                };
                shares[node].extend_from_slice(&members[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if shares.iter().all(|s| s.len() >= min_per_node) {
            return Ok(shares);
        }
    }
    Err(PartitionError::MinimumNotReached {
        attempts: MAX_ATTEMPTS,
        min: min_per_node,
    })
}

/// Per-node label histograms of a partition: `result[node][class]`.
pub fn histograms(labels: &[i64], shares: &[Vec<usize>], classes: usize) -> Vec<Vec<usize>> {
    shares
        .iter()
        .map(|share| {
            let mut counts = vec![0; classes];
            for &i in share {
                counts[labels[i] as usize] += 1;
            }
            counts
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<i64> {
        (0..n).map(|i| (i % 10) as i64).collect()
    }

    fn assert_exact_cover(shares: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = shares.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn iid_gives_equal_disjoint_shares() {
        let shares = split(&labels(1000), 4, Partition::Iid, 7).unwrap();
        assert_exact_cover(&shares, 1000);
        assert!(shares.iter().all(|s| s.len() == 250));
    }

    #[test]
    fn dirichlet_is_deterministic_disjoint_and_respects_minimum() {
        let p = Partition::Dirichlet {
            alpha: 0.5,
            min_per_node: 50,
        };
        let a = split(&labels(2000), 5, p, 42).unwrap();
        let b = split(&labels(2000), 5, p, 42).unwrap();
        assert_eq!(a, b);
        assert_exact_cover(&a, 2000);
        assert!(a.iter().all(|s| s.len() >= 50));
        let c = split(&labels(2000), 5, p, 43).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn small_alpha_skews_labels_more_than_large_alpha() {
        let skew = |alpha| {
            let p = Partition::Dirichlet {
                alpha,
                min_per_node: 1,
            };
            let l = labels(5000);
            let shares = split(&l, 4, p, 3).unwrap();
            // Mean over nodes of the largest class's fraction of the node's data.
            histograms(&l, &shares, 10)
                .iter()
                .map(|h| *h.iter().max().unwrap() as f64 / h.iter().sum::<usize>() as f64)
                .sum::<f64>()
                / 4.0
        };
        assert!(skew(0.1) > skew(100.0) + 0.2);
    }

    #[test]
    fn impossible_requests_are_errors() {
        let p = Partition::Dirichlet {
            alpha: 1.0,
            min_per_node: 100,
        };
        assert!(matches!(
            split(&labels(150), 2, p, 1),
            Err(PartitionError::TooFewSamples { .. })
        ));
        let bad = Partition::Dirichlet {
            alpha: -1.0,
            min_per_node: 0,
        };
        assert_eq!(
            split(&labels(10), 2, bad, 1),
            Err(PartitionError::BadAlpha(-1.0))
        );
        assert_eq!(
            split(&labels(10), 0, Partition::Iid, 1),
            Err(PartitionError::NoNodes)
        );
    }
}
