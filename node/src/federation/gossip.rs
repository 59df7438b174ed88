//! Compressed gossip with estimates of neighbours' models, after CHOCO-SGD (Koloskova et
//! al., 2019).
//!
//! Every node keeps a public estimate `x̂_i` of its own model, which its neighbours track
//! too, and an estimate `x̂_j` of each neighbour's. Each round a node sends
//! `q = Q(x_i - x̂_i)`, the compressed difference between its model and what neighbours
//! already know, and everyone adds `q` to their copy of `x̂_i`. What compression drops
//! stays in `x_i - x̂_i` and is sent in later rounds (error feedback). The node then moves
//! toward its neighbours: `x_i += gamma * sum_j w_ij (x̂_j - x̂_i)`. Without compression
//! and with `gamma = 1` this is exact Metropolis-Hastings averaging of the models.
//!
//! A neighbour of another architecture shares only some parameters, or slices of them
//! (see [`super::alignment`]): its estimate is kept cut down to the shared overlap, and
//! its differences are lifted back into this node's shapes when mixing.
//!
//! Estimates carry a version (the number of differences applied). A difference applies
//! only to the version it was computed against; a receiver whose copy is off (it lost a
//! message, restarted, or never heard from the sender) answers that it needs a keyframe,
//! and the sender then sends its whole public estimate once, uncompressed.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tch::{Kind, Tensor};

use super::alignment::Alignment;
use super::codec::{self, Encoding, Header, Update};
use super::mixing::Weights;

/// What a node knows of one neighbour's model.
pub struct Estimate {
    /// By index into the node's own parameter list, the neighbour's value cut down to the
    /// overlap with the node's; `None` where nothing is shared.
    values: Vec<Option<Tensor>>,
    pub version: u64,
    /// Whether `values` match the neighbour's public estimate at `version`.
    pub in_sync: bool,
    /// Round of the last update applied.
    pub last_round: Option<u64>,
}

/// The outcome of an incoming update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Applied {
        shared: usize,
    },
    NeedKeyframe,
    /// From a round before the last one applied from this sender: a replay (or a frame
    /// overtaken by a newer one), refused so that it cannot roll the estimate back.
    Replayed,
    /// The frame's model is not the one the member list gives its sender.
    WrongModel,
}

/// How a member's model relates to this node's: its fingerprint, and for each of this
/// node's parameters how the member's corresponds (`None`: not shared).
#[derive(Debug, Clone)]
pub struct PeerModel {
    pub fingerprint: String,
    pub alignment: Vec<Option<Alignment>>,
}

pub struct GossipState {
    federation: String,
    sender: String,
    fingerprint: String,
    names: Vec<String>,
    /// `x̂_i`: what neighbours know of this node's model.
    public: Vec<Tensor>,
    pub public_version: u64,
    /// The shared initial model, from which same-architecture estimates start.
    initial: Vec<Tensor>,
    index: HashMap<String, usize>,
    /// Members' models by name; a sender missing here is taken to share everything when
    /// its fingerprint is this node's and nothing otherwise.
    peers: HashMap<String, PeerModel>,
    pub neighbours: BTreeMap<String, Estimate>,
    /// Neighbour distances `|x̂_j - x̂_i|` of recent mixing steps, newest last, from which
    /// clipped mixing takes its radius.
    recent_distances: VecDeque<f64>,
}

/// Distances remembered for the clipping radius: a few rounds of a typical neighbourhood,
/// so that one round in which many neighbours jump does not move the radius with them.
const RECENT_DISTANCES: usize = 32;

/// How [`GossipState::mix`] treats each neighbour's difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mixing {
    /// Plain weighted averaging.
    Average,
    /// Each difference clipped to this multiple of the median recent distance.
    Clipped { factor: f64 },
}

impl GossipState {
    /// Starts from `params`, the shared initial model every same-architecture node has.
    pub fn new(
        federation: &str,
        sender: &str,
        fingerprint: &str,
        params: &[(String, Tensor)],
    ) -> GossipState {
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        // A copy: converting an f32 tensor to f32 would otherwise share its storage, and
        // the estimate would silently move with the model.
        let public: Vec<Tensor> = params.iter().map(|(_, t)| as_f32(t).copy()).collect();
        GossipState {
            federation: federation.to_string(),
            sender: sender.to_string(),
            fingerprint: fingerprint.to_string(),
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            initial: public.iter().map(|t| t.copy()).collect(),
            names,
            public,
            public_version: 0,
            peers: HashMap::new(),
            neighbours: BTreeMap::new(),
            recent_distances: VecDeque::with_capacity(RECENT_DISTANCES),
        }
    }

    /// Tells the state how member `name`'s model relates to this node's.
    pub fn with_peer(mut self, name: &str, model: PeerModel) -> GossipState {
        self.peers.insert(name.to_string(), model);
        self
    }

    /// How `from`'s parameters align with ours, given the fingerprint its frame claims;
    /// `None` when that is not the model the member list gives it.
    fn alignment_of(&self, from: &str, fingerprint: &str) -> Option<Vec<Option<Alignment>>> {
        match self.peers.get(from) {
            Some(peer) if peer.fingerprint == fingerprint => Some(peer.alignment.clone()),
            Some(_) => None,
            None if fingerprint == self.fingerprint => {
                Some(self.names.iter().map(|_| Some(Alignment::Whole)).collect())
            }
            None => Some(self.names.iter().map(|_| None).collect()),
        }
    }

    /// The alignment of a known neighbour's estimate (of a sender outside `peers`, the
    /// one its first frame established).
    fn known_alignment(&self, from: &str) -> Vec<Option<Alignment>> {
        match self.peers.get(from) {
            Some(peer) => peer.alignment.clone(),
            None => self.neighbours.get(from).map_or_else(Vec::new, |e| {
                e.values
                    .iter()
                    .map(|v| v.as_ref().map(|_| Alignment::Whole))
                    .collect()
            }),
        }
    }

    /// Compresses `x - x̂`, advances `x̂` by what was sent, and returns the frame.
    pub fn prepare(&mut self, params: &[Tensor], round: u64, encoding: Encoding) -> Vec<u8> {
        let diffs: Vec<(String, Tensor)> = self
            .names
            .iter()
            .zip(params.iter().zip(&self.public))
            .map(|(n, (x, x_hat))| (n.clone(), as_f32(x) - x_hat))
            .collect();
        let header = self.header(round, self.public_version, false);
        let (frame, sent) = codec::encode(&header, &diffs, encoding);
        tch::no_grad(|| {
            for (x_hat, q) in self.public.iter_mut().zip(&sent) {
                let _ = x_hat.g_add_(&q.to_device(x_hat.device()));
            }
        });
        self.public_version += 1;
        frame
    }

    /// The whole public estimate, for a neighbour that lost track of it.
    pub fn keyframe(&self, round: u64) -> Vec<u8> {
        let values: Vec<(String, Tensor)> = self
            .names
            .iter()
            .cloned()
            .zip(self.public.iter().map(|t| t.shallow_clone()))
            .collect();
        let header = self.header(round, self.public_version, true);
        codec::encode(&header, &values, Encoding::Fp32).0
    }

    fn header(&self, round: u64, base_version: u64, keyframe: bool) -> Header {
        Header {
            federation: self.federation.clone(),
            sender: self.sender.clone(),
            round,
            base_version,
            keyframe,
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Applies a decoded update from neighbour `from` to its estimate.
    pub fn receive(&mut self, from: &str, update: Update) -> Received {
        let header = &update.header;
        let Some(alignment) = self.alignment_of(from, &header.fingerprint) else {
            return Received::WrongModel;
        };
        let known = self.neighbours.contains_key(from);
        if !known {
            // Same-architecture neighbours start from the shared initial model at version
            // 0; anyone else must first send a keyframe.
            let same = header.fingerprint == self.fingerprint;
            let values = if same {
                self.initial.iter().map(|t| Some(t.copy())).collect()
            } else {
                (0..self.names.len()).map(|_| None).collect()
            };
            self.neighbours.insert(
                from.to_string(),
                Estimate {
                    values,
                    version: 0,
                    in_sync: same,
                    last_round: None,
                },
            );
        }
        let estimate = self.neighbours.get_mut(from).expect("inserted above");
        if estimate.last_round.is_some_and(|last| header.round < last) {
            return Received::Replayed;
        }

        let shared = |name: &String| {
            let &i = self.index.get(name)?;
            Some((i, alignment[i].as_ref()?))
        };
        if header.keyframe {
            estimate.values = (0..self.names.len()).map(|_| None).collect();
            for (name, tensor) in &update.tensors {
                if let Some((i, align)) = shared(name) {
                    let value = align.theirs_to_overlap(tensor).copy();
                    estimate.values[i] = Some(value.to_device(self.public[i].device()));
                }
            }
            estimate.version = header.base_version;
            estimate.in_sync = true;
        } else if estimate.in_sync && estimate.version == header.base_version {
            tch::no_grad(|| {
                for (name, q) in &update.tensors {
                    let Some((i, align)) = shared(name) else {
                        continue;
                    };
                    if let Some(value) = estimate.values[i].as_mut() {
                        let q = align.theirs_to_overlap(q);
                        let _ = value.g_add_(&q.to_device(value.device()));
                    }
                }
            });
            estimate.version += 1;
        } else {
            estimate.in_sync = false;
            return Received::NeedKeyframe;
        }
        estimate.last_round = Some(
            estimate
                .last_round
                .map_or(header.round, |r| r.max(header.round)),
        );
        Received::Applied {
            shared: estimate.values.iter().filter(|v| v.is_some()).count(),
        }
    }

    /// Moves `params` toward the neighbours' estimates: `x += gamma sum_j w_j (x̂_j - x̂)`,
    /// each difference first clipped when `mixing` says so. Neighbours not in sync, or
    /// last heard from before `oldest_round`, are left out, and their weight stays with
    /// the node. Returns the neighbours used.
    pub fn mix(
        &mut self,
        params: &mut [Tensor],
        weights: &Weights,
        gamma: f64,
        oldest_round: u64,
        mixing: Mixing,
    ) -> Vec<String> {
        let mut alignments: HashMap<&String, Vec<Option<Alignment>>> = weights
            .neighbours
            .keys()
            .map(|name| (name, self.known_alignment(name)))
            .collect();
        let used: Vec<(&String, &Estimate, f64, Vec<Option<Alignment>>)> = weights
            .neighbours
            .iter()
            .filter_map(|(name, &w)| {
                let e = self.neighbours.get(name)?;
                let fresh = e.last_round.is_some_and(|r| r >= oldest_round);
                let align = alignments.remove(name)?;
                (e.in_sync && fresh).then_some((name, e, w, align))
            })
            .collect();

        // Clipping scales a whole difference down to the radius, keeping its direction.
        let scales: Vec<f64> = match mixing {
            Mixing::Average => vec![1.0; used.len()],
            Mixing::Clipped { factor } => {
                let distances: Vec<f64> = used
                    .iter()
                    .map(|(_, e, _, align)| distance(&e.values, &self.public, align))
                    .collect();
                let mut history: Vec<f64> = self
                    .recent_distances
                    .iter()
                    .chain(&distances)
                    .copied()
                    .filter(|d| d.is_finite())
                    .collect();
                let radius = factor * median(&mut history).unwrap_or(f64::INFINITY);
                for &d in &distances {
                    if self.recent_distances.len() == RECENT_DISTANCES {
                        self.recent_distances.pop_front();
                    }
                    self.recent_distances.push_back(d);
                }
                distances
                    .iter()
                    .map(|&d| if d > radius { radius / d } else { 1.0 })
                    .collect()
            }
        };

        tch::no_grad(|| {
            for (i, x) in params.iter_mut().enumerate() {
                let mut correction: Option<Tensor> = None;
                for ((_, estimate, w, align), scale) in used.iter().zip(&scales) {
                    let (Some(value), Some(align)) = (&estimate.values[i], &align[i]) else {
                        continue;
                    };
                    let public = &self.public[i];
                    let difference = value - align.mine_to_overlap(public);
                    let term = align.lift(difference, public) * (gamma * w * scale);
                    correction = Some(match correction {
                        Some(c) => c + term,
                        None => term,
                    });
                }
                if let Some(c) = correction {
                    let _ = x.g_add_(&c.to_kind(x.kind()));
                }
            }
        });
        used.into_iter().map(|(n, ..)| n.clone()).collect()
    }

    /// Root-mean-square L2 distance between `params` and the in-sync neighbour estimates,
    /// over the parameters each shares.
    pub fn consensus_distance(&self, params: &[Tensor]) -> Option<f64> {
        let params: Vec<Tensor> = params.iter().map(as_f32).collect();
        let distances: Vec<f64> = self
            .neighbours
            .iter()
            .filter(|(_, e)| e.in_sync)
            .filter_map(|(name, e)| {
                let align = self.known_alignment(name);
                let shared = e
                    .values
                    .iter()
                    .zip(&align)
                    .any(|(v, a)| v.is_some() && a.is_some());
                shared.then(|| distance(&e.values, &params, &align).powi(2))
            })
            .collect();
        (!distances.is_empty())
            .then(|| (distances.iter().sum::<f64>() / distances.len() as f64).sqrt())
    }

    /// `x̂_i`, what neighbours know of this node's model.
    pub fn public(&self) -> &[Tensor] {
        &self.public
    }

    /// Names of this node's parameters, in the order every tensor list here uses.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// State for a checkpoint: the public estimate and every neighbour estimate, with
    /// versions in the returned metadata.
    pub fn state(&self) -> (Vec<(String, Tensor)>, BTreeMap<String, String>) {
        let mut tensors = Vec::new();
        let mut meta = BTreeMap::new();
        for (n, t) in self.names.iter().zip(&self.public) {
            tensors.push((format!("gossip.public.{n}"), t.shallow_clone()));
        }
        meta.insert(
            "gossip.public.version".into(),
            self.public_version.to_string(),
        );
        for (peer, e) in &self.neighbours {
            if !e.in_sync {
                continue;
            }
            for (n, v) in self.names.iter().zip(&e.values) {
                if let Some(v) = v {
                    tensors.push((format!("gossip.peer.{peer}.{n}"), v.shallow_clone()));
                }
            }
            meta.insert(format!("gossip.peer.{peer}.version"), e.version.to_string());
            let round = e.last_round.map_or(String::new(), |r| r.to_string());
            meta.insert(format!("gossip.peer.{peer}.round"), round);
        }
        (tensors, meta)
    }

    /// Restores what [`GossipState::state`] saved. Peers missing from the checkpoint start
    /// out of sync and will receive a keyframe.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, meta: &BTreeMap<String, String>) {
        let device = self.public.first().map(|t| t.device());
        for (i, n) in self.names.iter().enumerate() {
            if let Some(t) = tensors.get(&format!("gossip.public.{n}")) {
                self.public[i] = t.to_device(device.unwrap_or(tch::Device::Cpu));
            }
        }
        self.public_version = meta
            .get("gossip.public.version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        for (key, version) in meta {
            let Some(peer) = key
                .strip_prefix("gossip.peer.")
                .and_then(|k| k.strip_suffix(".version"))
            else {
                continue;
            };
            let values: Vec<Option<Tensor>> = self
                .names
                .iter()
                .map(|n| {
                    tensors
                        .get(&format!("gossip.peer.{peer}.{n}"))
                        .map(|t| t.copy())
                })
                .collect();
            // An estimate saved under another alignment (the manifest changed what is
            // shared) cannot be used; the peer will send a keyframe instead.
            let expected: Vec<Option<Vec<i64>>> = match self.peers.get(peer) {
                Some(model) => model
                    .alignment
                    .iter()
                    .zip(&self.public)
                    .map(|(a, x)| a.as_ref().map(|a| a.mine_to_overlap(x).size()))
                    .collect(),
                None => self.public.iter().map(|x| Some(x.size())).collect(),
            };
            let fits = values.iter().zip(&expected).all(|(v, e)| match (v, e) {
                (Some(v), Some(e)) => v.size() == *e,
                (Some(_), None) => false,
                (None, _) => true,
            });
            if !fits {
                tracing::warn!(%peer, "saved estimate does not fit the current alignment");
                continue;
            }
            let last_round = meta
                .get(&format!("gossip.peer.{peer}.round"))
                .and_then(|r| r.parse().ok());
            self.neighbours.insert(
                peer.to_string(),
                Estimate {
                    values,
                    version: version.parse().unwrap_or(0),
                    in_sync: true,
                    last_round,
                },
            );
        }
    }
}

/// L2 distance between an estimate and `reference` over the overlap of the parameters it
/// holds.
fn distance(values: &[Option<Tensor>], reference: &[Tensor], align: &[Option<Alignment>]) -> f64 {
    let squares: f64 = values
        .iter()
        .zip(reference)
        .zip(align)
        .filter_map(|((v, r), a)| {
            let (v, a) = (v.as_ref()?, a.as_ref()?);
            Some((v - a.mine_to_overlap(r)).square().sum(Kind::Double))
        })
        .map(|t| t.double_value(&[]))
        .sum();
    squares.sqrt()
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

fn as_f32(t: &Tensor) -> Tensor {
    t.detach().to_kind(Kind::Float).contiguous()
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::federation::codec::{decode, Layout};
    use crate::federation::misbehaviour;
    use crate::federation::mixing::metropolis_hastings;
    use edgesync_api::{Misbehaviour, MisbehaviourKind};

    fn model(value: f32) -> Vec<(String, Tensor)> {
        vec![(
            "w".into(),
            Tensor::full([4], value as f64, (Kind::Float, Device::Cpu)),
        )]
    }

    fn node(name: &str) -> GossipState {
        GossipState::new("demo", name, "fp", &model(0.0))
    }

    fn layout() -> Layout {
        Layout::new("demo", "fp", &model(0.0))
    }

    /// Runs rounds of gossip among fully connected nodes whose models are `values`.
    fn gossip_rounds(values: &[f32], encoding: Encoding, gamma: f64, rounds: u64) -> Vec<f64> {
        let plain = Gossip {
            encoding,
            gamma,
            mixing: Mixing::Average,
            misbehaving: None,
        };
        run_gossip(values, plain, rounds)
    }

    #[derive(Clone, Copy)]
    struct Gossip {
        encoding: Encoding,
        gamma: f64,
        mixing: Mixing,
        /// A node that publishes a corrupted model, and how.
        misbehaving: Option<(usize, Misbehaviour)>,
    }

    fn run_gossip(values: &[f32], gossip: Gossip, rounds: u64) -> Vec<f64> {
        let Gossip {
            encoding,
            gamma,
            mixing,
            misbehaving,
        } = gossip;
        let names: Vec<String> = (0..values.len()).map(|i| format!("n{i}")).collect();
        let mut states: Vec<GossipState> = names.iter().map(|n| node(n)).collect();
        let mut params: Vec<Vec<Tensor>> = values
            .iter()
            .map(|&v| vec![model(v)[0].1.shallow_clone()])
            .collect();
        for round in 1..=rounds {
            let frames: Vec<Vec<u8>> = states
                .iter_mut()
                .zip(&params)
                .enumerate()
                .map(|(i, (s, p))| match misbehaving {
                    Some((bad, how)) if bad == i => {
                        // Its "training" moves it by 1 each round; it publishes that
                        // change distorted.
                        let before: Vec<Tensor> = p.iter().map(|t| t - 1.0).collect();
                        let corrupted = misbehaviour::corrupt(how, p, &before);
                        s.prepare(&corrupted, round, encoding)
                    }
                    _ => s.prepare(p, round, encoding),
                })
                .collect();
            for (i, state) in states.iter_mut().enumerate() {
                for (j, frame) in frames.iter().enumerate() {
                    if i != j {
                        let update = decode(frame, &layout()).unwrap();
                        assert!(matches!(
                            state.receive(&names[j], update),
                            Received::Applied { .. }
                        ));
                    }
                }
            }
            for (i, state) in states.iter_mut().enumerate() {
                // The misbehaving node trains on its own and never mixes.
                if let Some((bad, _)) = misbehaving {
                    if bad == i {
                        let _ = params[i][0].g_add_scalar_(1.0);
                        continue;
                    }
                }
                let degrees = names
                    .iter()
                    .filter(|n| **n != names[i])
                    .map(|n| (n.clone(), Some(values.len() - 1)))
                    .collect();
                let w = metropolis_hastings(values.len() - 1, &degrees);
                state.mix(&mut params[i], &w, gamma, round, mixing);
            }
        }
        params.iter().map(|p| p[0].double_value(&[0])).collect()
    }

    #[test]
    fn uncompressed_gossip_averages_a_full_mesh_in_one_round() {
        let out = gossip_rounds(&[0.0, 3.0, 9.0], Encoding::Fp32, 1.0, 1);
        for v in out {
            assert!((v - 4.0).abs() < 1e-5, "{v}");
        }
    }

    #[test]
    fn compressed_gossip_converges_to_the_average() {
        for (encoding, gamma) in [(Encoding::TopK(0.25), 0.5), (Encoding::Quantized(3), 1.0)] {
            let out = gossip_rounds(&[0.0, 3.0, 9.0, 4.0], encoding, gamma, 60);
            for v in &out {
                assert!((v - 4.0).abs() < 0.05, "{encoding:?}: {out:?}");
            }
        }
    }

    #[test]
    fn clipping_keeps_one_misbehaving_node_from_ruining_the_rest() {
        let honest = [1.0f32, 2.0, 3.0, 4.0];
        let mut values = honest.to_vec();
        values.push(2.5);
        let spread = |out: &[f64]| {
            let honest = &out[..4];
            let max = honest.iter().copied().fold(f64::MIN, f64::max);
            let min = honest.iter().copied().fold(f64::MAX, f64::min);
            (min, max)
        };
        for kind in [MisbehaviourKind::Scaled, MisbehaviourKind::SignFlip] {
            let attack = Gossip {
                encoding: Encoding::Fp32,
                gamma: 1.0,
                mixing: Mixing::Average,
                misbehaving: Some((4, Misbehaviour { kind, scale: 10.0 })),
            };
            // Plain averaging follows the misbehaving node far out of the honest range.
            let (min, max) = spread(&run_gossip(&values, attack, 20));
            assert!(min > 5.0 || max < 0.0, "{kind:?}: {min} {max}");

            // Clipped, the honest nodes agree, within the range they started in.
            let clipped = Gossip {
                mixing: Mixing::Clipped { factor: 1.0 },
                ..attack
            };
            let (min, max) = spread(&run_gossip(&values, clipped, 20));
            assert!(max - min < 0.05, "{kind:?}: {min} {max}");
            assert!(min > 1.0 && max < 4.0, "{kind:?}: {min} {max}");
        }
    }

    #[test]
    fn clipping_leaves_honest_neighbours_averaging() {
        let clipped = Gossip {
            encoding: Encoding::Fp32,
            gamma: 1.0,
            mixing: Mixing::Clipped { factor: 1.0 },
            misbehaving: None,
        };
        // They agree; the far-out 9 is clipped, so the common value is not exactly the
        // mean of 4, which is the price of bounding every neighbour's pull.
        let out = run_gossip(&[0.0, 3.0, 9.0, 4.0], clipped, 30);
        for v in &out {
            assert!((v - out[0]).abs() < 1e-3, "{out:?}");
            assert!((v - 4.0).abs() < 0.5, "{out:?}");
        }
    }

    #[test]
    fn replayed_frames_cannot_roll_an_estimate_back() {
        let mut a = node("a");
        let mut b = node("b");
        let old_keyframe = a.keyframe(1);
        let first = a.prepare(&[model(1.0)[0].1.shallow_clone()], 1, Encoding::Fp32);
        let second = a.prepare(&[model(2.0)[0].1.shallow_clone()], 2, Encoding::Fp32);
        for frame in [&first, &second] {
            let update = decode(frame, &layout()).unwrap();
            assert!(matches!(b.receive("a", update), Received::Applied { .. }));
        }
        for replay in [&old_keyframe, &first] {
            let update = decode(replay, &layout()).unwrap();
            assert_eq!(b.receive("a", update), Received::Replayed);
        }
        let estimate = b.neighbours["a"].values[0].as_ref().unwrap();
        assert_eq!(estimate.double_value(&[0]), 2.0);
    }

    #[test]
    fn a_lost_update_is_detected_and_healed_by_a_keyframe() {
        let mut a = node("a");
        let mut b = node("b");
        let params = vec![model(1.0)[0].1.shallow_clone()];
        let first = a.prepare(&params, 1, Encoding::Fp32);
        assert!(matches!(
            b.receive("a", decode(&first, &layout()).unwrap()),
            Received::Applied { .. }
        ));
        let params = vec![model(2.0)[0].1.shallow_clone()];
        let _lost = a.prepare(&params, 2, Encoding::Fp32);
        let params = vec![model(5.0)[0].1.shallow_clone()];
        let third = a.prepare(&params, 3, Encoding::Fp32);
        assert_eq!(
            b.receive("a", decode(&third, &layout()).unwrap()),
            Received::NeedKeyframe
        );

        let key = a.keyframe(3);
        assert!(matches!(
            b.receive("a", decode(&key, &layout()).unwrap()),
            Received::Applied { .. }
        ));
        let estimate = b.neighbours["a"].values[0]
            .as_ref()
            .unwrap()
            .double_value(&[0]);
        assert!((estimate - 5.0).abs() < 1e-6);
    }

    #[test]
    fn state_survives_a_checkpoint_round_trip() {
        let mut a = node("a");
        let mut b = node("b");
        let frame = a.prepare(&[model(2.0)[0].1.shallow_clone()], 1, Encoding::Fp32);
        b.receive("a", decode(&frame, &layout()).unwrap());
        let (tensors, meta) = b.state();
        let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();

        let mut restored = node("b");
        restored.restore(&tensors, &meta);
        assert_eq!(restored.neighbours["a"].version, 1);
        let frame = a.prepare(&[model(3.0)[0].1.shallow_clone()], 2, Encoding::Fp32);
        let got = restored.receive("a", decode(&frame, &layout()).unwrap());
        assert!(matches!(got, Received::Applied { shared: 1 }));
    }

    #[test]
    fn different_architectures_average_their_overlap_and_keep_the_rest() {
        use crate::federation::alignment::{self, ModelShapes};
        use edgesync_api::SharedLayers;

        let tensor = |shape: &[i64], seed: f64| {
            Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu))
                .view(shape)
                .sin()
                * seed
        };
        // A colour model with four filters, and a grey one holding the first two.
        let wide = vec![
            ("bn1.running_mean".to_string(), tensor(&[4], 1.0)),
            ("conv1.weight".to_string(), tensor(&[4, 3, 1, 1], 1.0)),
        ];
        let narrow = vec![
            ("bn1.running_mean".to_string(), tensor(&[2], -2.0)),
            ("conv1.weight".to_string(), tensor(&[2, 1, 1, 1], -2.0)),
        ];
        let shapes = |fp: &str, p: &[(String, Tensor)]| ModelShapes {
            fingerprint: fp.into(),
            params: p.iter().map(|(n, t)| (n.clone(), t.size())).collect(),
        };
        let (w, n) = (shapes("wide", &wide), shapes("narrow", &narrow));
        let peer = |mine: &ModelShapes, theirs: &ModelShapes| PeerModel {
            fingerprint: theirs.fingerprint.clone(),
            alignment: alignment::plan(mine, theirs, SharedLayers::Features),
        };
        let mut states = [
            GossipState::new("demo", "wide", "wide", &wide).with_peer("narrow", peer(&w, &n)),
            GossipState::new("demo", "narrow", "narrow", &narrow).with_peer("wide", peer(&n, &w)),
        ];
        let layout = Layout::new("demo", "wide", &wide).with_model("narrow", n.params.clone());
        let mut params: [Vec<Tensor>; 2] = [
            wide.iter().map(|(_, t)| t.copy()).collect(),
            narrow.iter().map(|(_, t)| t.copy()).collect(),
        ];
        let before: Vec<Vec<Tensor>> = params
            .iter()
            .map(|p| p.iter().map(|t| t.copy()).collect())
            .collect();
        let names = ["wide", "narrow"];

        // A stranger's first difference asks for a keyframe; the keyframe is then applied.
        for (i, j) in [(0, 1), (1, 0)] {
            let frame = states[i].prepare(&params[i], 1, Encoding::Fp32);
            let got = states[j].receive(names[i], decode(&frame, &layout).unwrap());
            assert_eq!(got, Received::NeedKeyframe);
            let keyframe = states[i].keyframe(1);
            let got = states[j].receive(names[i], decode(&keyframe, &layout).unwrap());
            assert_eq!(got, Received::Applied { shared: 1 });
        }
        for (i, j) in [(0, 1), (1, 0)] {
            let weights = Weights {
                own: 0.5,
                neighbours: BTreeMap::from([(names[j].to_string(), 0.5)]),
            };
            states[i].mix(&mut params[i], &weights, 1.0, 1, Mixing::Average);
        }

        // Exact averaging of the overlap: the wide model's channel sum over its first two
        // filters now equals the narrow model's kernel, halfway between where both began.
        let sum = |t: &Tensor| {
            t.narrow(0, 0, 2)
                .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
        };
        let middle = (sum(&before[0][1]) + &before[1][1]) / 2.0;
        assert!(sum(&params[0][1]).allclose(&middle, 1e-5, 1e-5, false));
        assert!(params[1][1].allclose(&middle, 1e-5, 1e-5, false));
        // What only the wide model has, and running statistics on both sides, did not move.
        assert!(params[0][1]
            .narrow(0, 2, 2)
            .equal(&before[0][1].narrow(0, 2, 2)));
        assert!(params[0][0].equal(&before[0][0]) && params[1][0].equal(&before[1][0]));

        // A frame claiming a model other than the member list's for its sender is refused.
        let frame = states[0].keyframe(2);
        assert_eq!(
            states[0].receive("narrow", decode(&frame, &layout).unwrap()),
            Received::WrongModel
        );
    }
}
