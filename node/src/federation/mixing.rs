//! Metropolis-Hastings gossip weights.
//!
//! Node i gives each live neighbour j the weight `w_ij = 1 / (1 + max(d_i, d_j))`, where
//! `d` is a node's live degree, and keeps `1 - sum_j w_ij` for itself. The rule needs only
//! what a node can learn from its neighbours (their degrees), and the resulting matrix is
//! symmetric and doubly stochastic, so repeated gossip converges to the plain average of
//! all nodes' models on any connected graph.

use std::collections::BTreeMap;

/// One node's row of the mixing matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub own: f64,
    pub neighbours: BTreeMap<String, f64>,
}

/// The weights of a node whose live degree is `own_degree`, given each live neighbour's
/// degree. A neighbour whose degree is unknown yet is taken to have the node's own degree.
pub fn metropolis_hastings(
    own_degree: usize,
    neighbour_degrees: &BTreeMap<String, Option<usize>>,
) -> Weights {
    let neighbours: BTreeMap<String, f64> = neighbour_degrees
        .iter()
        .map(|(name, degree)| {
            let d = degree.unwrap_or(own_degree).max(own_degree);
            (name.clone(), 1.0 / (1.0 + d as f64))
        })
        .collect();
    let own = 1.0 - neighbours.values().sum::<f64>();
    Weights { own, neighbours }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The full mixing matrix of a graph, each row computed as its node would.
    fn matrix(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<(String, String), f64> {
        let mut w = BTreeMap::new();
        for (node, links) in graph {
            let degrees = links
                .iter()
                .map(|n| (n.clone(), Some(graph[n].len())))
                .collect();
            let row = metropolis_hastings(links.len(), &degrees);
            w.insert((node.clone(), node.clone()), row.own);
            for (n, v) in row.neighbours {
                w.insert((node.clone(), n), v);
            }
        }
        w
    }

    fn graph(edges: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default().insert(a.to_string());
        }
        g
    }

    #[test]
    fn weights_are_symmetric_and_rows_sum_to_one() {
        // A star joined to a path: degrees 1 to 4, so the max() in the rule matters.
        let g = graph(&[
            ("a", "b"),
            ("a", "c"),
            ("a", "d"),
            ("a", "e"),
            ("e", "f"),
            ("f", "g"),
        ]);
        let w = matrix(&g);
        for node in g.keys() {
            let row: f64 = w
                .iter()
                .filter(|((i, _), _)| i == node)
                .map(|(_, v)| v)
                .sum();
            assert!((row - 1.0).abs() < 1e-12, "row {node} sums to {row}");
        }
        for ((i, j), v) in &w {
            assert!(*v >= 0.0);
            let back = w.get(&(j.clone(), i.clone())).copied().unwrap_or(0.0);
            assert!(
                (v - back).abs() < 1e-12,
                "w[{i}][{j}] = {v}, w[{j}][{i}] = {back}"
            );
        }
    }

    #[test]
    fn full_mesh_weights_are_uniform() {
        let g = graph(&[("a", "b"), ("a", "c"), ("b", "c")]);
        let w = matrix(&g);
        assert!(w.values().all(|v| (v - 1.0 / 3.0).abs() < 1e-12));
    }

    #[test]
    fn an_isolated_node_keeps_its_own_model() {
        let w = metropolis_hastings(0, &BTreeMap::new());
        assert_eq!(w.own, 1.0);
        assert!(w.neighbours.is_empty());
    }
}
