//! One node of a federation: the round loop behind `dfl-node run`.
//!
//! Each round: train locally (on a blocking thread, while the async side keeps answering
//! neighbours), send the compressed difference to every exchange partner, wait for theirs
//! until all have arrived or the round deadline passes, mix with Metropolis-Hastings
//! weights, apply momentum, evaluate when due, and checkpoint. Progress is printed as one
//! JSON object per line on stdout for whoever launched the node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use edgesync_api::{
    AggregationRule, CompressionKind, LrSchedule, OptimizerKind as ApiOptimizer, PartitionSpec,
};
use libp2p::{identity, Multiaddr, PeerId};
use tch::nn;
use tch::{Kind, Tensor};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::alignment::{self, ModelShapes};
use super::codec::{self, Encoding, Layout};
use super::config::{self, NodeConfig};
use super::gossip::{GossipState, Mixing, PeerModel, Received};
use super::misbehaviour;
use super::mixing::metropolis_hastings;
use super::momentum::RoundMomentum;
use super::network::{self, Ack, NetworkEvent, NetworkHandle, Peer, Presence};
use super::report::{NodeEvent, RoundRecord};
use crate::akida;
use crate::data::{self, partition, Dataset, Split};
use crate::eval::EvalReport;
use crate::faults::FaultPlan;
use crate::metrics::NodeMetrics;
use crate::model::{self, SubNetwork};
use crate::optim::{OptimizerConfig, OptimizerKind};
use crate::train::{TrainConfig, Trainer};
use crate::web;

/// Called with every progress event the node prints, e.g. to report it to the cluster.
pub type EventHook = Box<dyn Fn(&NodeEvent) + Send + Sync>;

/// How long a node waits at start-up to hear which round its neighbours are at.
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Per-round counters of the exchange.
#[derive(Debug, Default, Clone)]
struct Counters {
    bytes_sent: u64,
    bytes_received: u64,
    updates_received: u64,
    updates_dropped: BTreeMap<&'static str, u64>,
    strangers_refused: u64,
}

/// What the node knows of a neighbour from presence messages.
#[derive(Debug, Clone, Default)]
struct PeerView {
    round: u64,
    degree: Option<usize>,
    done: bool,
}

/// The model and the node's data, which travel together to the blocking thread: libtorch
/// tensors may move between threads but not be shared by them.
struct Local {
    trainer: Trainer,
    train: Dataset,
    test: Dataset,
}

struct Node {
    config: NodeConfig,
    /// Away (`None`) only while training or evaluation runs on a blocking thread.
    local: Option<Local>,
    train_samples: usize,
    gossip: GossipState,
    momentum: RoundMomentum,
    /// Indices (into the gossip parameter list) of trainable parameters.
    trainable: Vec<usize>,
    layout: Layout,
    network: NetworkHandle,
    events: mpsc::Receiver<NetworkEvent>,
    /// Neighbours whose models share at least one parameter with ours.
    partners: BTreeSet<String>,
    neighbours: BTreeSet<String>,
    connected: BTreeSet<String>,
    peers: BTreeMap<String, PeerView>,
    counters: Counters,
    round: u64,
    encoding: Encoding,
    deadline: Duration,
    checkpoint: PathBuf,
    /// Faults this node injects into itself; empty outside fault tests.
    faults: FaultPlan,
    stop: Arc<AtomicBool>,
    metrics: Arc<NodeMetrics>,
    /// The metrics endpoint, when the configuration asks for one.
    server: Option<web::Server>,
    hook: Option<EventHook>,
}

/// How a node's run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every round of the federation ran.
    Completed,
    /// Asked to stop before the last round; the checkpoint lets it resume.
    Stopped,
}

/// Runs the node described by `config` until its last round, or until `stop` is set;
/// `hook` sees every progress event, and `faults` is what the node injects into itself.
pub async fn run(
    config: NodeConfig,
    stop: Arc<AtomicBool>,
    hook: Option<EventHook>,
    faults: FaultPlan,
) -> anyhow::Result<Outcome> {
    let mut node = Node::start(config, stop, hook, faults).await?;
    node.join_current_round().await;
    let rounds = node.config.federation_spec.rounds;
    while node.round <= rounds && !node.stop.load(Ordering::Relaxed) {
        node.run_round().await?;
    }
    let outcome = if node.round > rounds {
        Outcome::Completed
    } else {
        Outcome::Stopped
    };
    node.linger().await;
    if let Some(server) = node.server.take() {
        server.stop().await;
    }
    Ok(outcome)
}

impl Node {
    async fn start(
        config: NodeConfig,
        stop: Arc<AtomicBool>,
        hook: Option<EventHook>,
        faults: FaultPlan,
    ) -> anyhow::Result<Node> {
        let device = crate::device::select(config.threads);
        let me = config
            .me()
            .with_context(|| format!("node {} is not in its own member list", config.name))?
            .clone();
        // The member list bounds the per-neighbour series.
        let member_neighbours: Vec<String> = config
            .members
            .iter()
            .filter(|m| m.neighbour && m.name != config.name)
            .map(|m| m.name.clone())
            .collect();
        let metrics = Arc::new(NodeMetrics::new(
            &config.federation,
            &config.name,
            &crate::device::describe(device),
            &member_neighbours,
        )?);
        // Started before the data loads, so that probes see a live process meanwhile.
        let server = match config.metrics_address {
            Some(addr) => Some(web::Server::start(addr, metrics.clone()).await?),
            None => None,
        };

        let (train, test) = load_data(&config, &me).await?;
        metrics.readiness.data_loaded.store(true, Ordering::Relaxed);
        let spec = config::model_spec(&me.model);
        let train_config = train_config(&config);
        let mut trainer = Trainer::new(spec, train_config, train.len(), device);
        metrics.readiness.model_built.store(true, Ordering::Relaxed);
        let fingerprint = trainer.fingerprint();
        let params = trainer.parameters();
        let trainable = trainable_indices(&trainer, &params);
        let own = ModelShapes {
            fingerprint: fingerprint.clone(),
            params: params.iter().map(|(n, t)| (n.clone(), t.size())).collect(),
        };
        let shared = config.federation_spec.aggregation.cross_architecture;
        let mut layout = Layout::new(&config.federation, &fingerprint, &params);
        let mut gossip = GossipState::new(&config.federation, &config.name, &fingerprint, &params);
        let mut partners = BTreeSet::new();
        for (name, model) in member_models(&config) {
            if name == config.name {
                continue;
            }
            let alignment = alignment::plan(&own, &model, shared);
            let neighbour = config.members.iter().any(|m| m.name == name && m.neighbour);
            if neighbour && alignment.iter().any(Option::is_some) {
                partners.insert(name.clone());
                if let Some(sub) = alignment::narrower_neighbour(&own, &alignment) {
                    let input_side = config
                        .members
                        .iter()
                        .find(|m| m.name == name)
                        .and_then(|m| m.model.input_side);
                    let sub = SubNetwork { input_side, ..sub };
                    tracing::info!(
                        neighbour = %name,
                        fraction = sub.fraction,
                        grey = sub.grey,
                        input_side = ?sub.input_side,
                        "also training the leading channels the narrower neighbour holds"
                    );
                    trainer.train_sub_network(sub);
                }
            }
            layout = layout.with_model(&model.fingerprint, model.params);
            let peer = PeerModel {
                fingerprint: model.fingerprint,
                alignment,
            };
            gossip = gossip.with_peer(&name, peer);
        }
        let trainable_params: Vec<Tensor> = trainable
            .iter()
            .map(|&i| params[i].1.shallow_clone())
            .collect();
        let momentum = RoundMomentum::new(
            config.federation_spec.momentum.kind,
            config.federation_spec.momentum.beta,
            &trainable_params,
        );
        let neighbours: BTreeSet<String> = config
            .members
            .iter()
            .filter(|m| m.neighbour)
            .map(|m| m.name.clone())
            .collect();
        tracing::info!(
            node = %config.name,
            fingerprint = %fingerprint,
            neighbours = ?neighbours,
            exchange_partners = ?partners,
            parameters = params.len(),
            "model built"
        );

        let exchange = &config.federation_spec.exchange;
        let deadline = Duration::from_secs_f64(exchange.round_deadline_seconds);
        let encoding = match exchange.compression.kind {
            CompressionKind::None => Encoding::Fp32,
            CompressionKind::Fp16 => Encoding::Fp16,
            CompressionKind::Int8 => Encoding::Int8,
            CompressionKind::TopK => Encoding::TopK(exchange.compression.fraction),
            CompressionKind::Quantized => Encoding::Quantized(exchange.compression.bits),
        };
        let checkpoint = config
            .state_dir
            .join(format!("{}.safetensors", config.name));

        let (network, events) =
            start_network(&config, layout.max_frame, deadline, faults.send_delay)?;
        metrics.readiness.listening.store(true, Ordering::Relaxed);
        let train_samples = train.len();
        let mut node = Node {
            local: Some(Local {
                trainer,
                train,
                test,
            }),
            train_samples,
            gossip,
            momentum,
            trainable,
            layout,
            network,
            events,
            partners,
            neighbours,
            connected: BTreeSet::new(),
            peers: BTreeMap::new(),
            counters: Counters::default(),
            round: 1,
            encoding,
            deadline,
            checkpoint,
            faults,
            stop,
            metrics,
            server,
            hook,
            config,
        };
        node.update_peering();
        node.resume()?;
        node.emit(NodeEvent::Started {
            node: node.config.name.clone(),
            round: node.round,
            train_samples: node.train_samples,
            fingerprint,
            exchange_partners: node.partners.iter().cloned().collect(),
        });
        Ok(node)
    }

    fn trainer(&mut self) -> &mut Trainer {
        &mut self
            .local
            .as_mut()
            .expect("the model is only away during blocking work")
            .trainer
    }

    /// Loads the checkpoint if one exists: model, optimiser, gossip state and momentum.
    fn resume(&mut self) -> anyhow::Result<()> {
        if !self.checkpoint.exists() {
            return Ok(());
        }
        let path = self.checkpoint.clone();
        let ck = self.trainer().load_checkpoint(&path)?;
        self.gossip.restore(&ck.tensors, &ck.metadata);
        let names = self.gossip.names().to_vec();
        for (slot, &i) in self.momentum.velocity_mut().iter_mut().zip(&self.trainable) {
            if let Some(v) = ck.tensors.get(&format!("momentum.{}", names[i])) {
                *slot = v.to_device(slot.device());
            }
        }
        self.round = ck.field::<u64>("round")? + 1;
        tracing::info!(path = %path.display(), round = self.round, "resumed from checkpoint");
        Ok(())
    }

    fn save_checkpoint(&mut self) -> anyhow::Result<()> {
        let (mut tensors, mut meta) = self.gossip.state();
        let names = self.gossip.names().to_vec();
        for (v, &i) in self.momentum.velocity().iter().zip(&self.trainable) {
            tensors.push((format!("momentum.{}", names[i]), v.shallow_clone()));
        }
        meta.insert("round".into(), self.round.to_string());
        meta.insert("federation".into(), self.config.federation.clone());
        let path = self.checkpoint.clone();
        let stall = self.faults.checkpoint_stall;
        self.trainer()
            .save_checkpoint(&path, tensors, meta, stall)?;
        Ok(())
    }

    /// A node that starts late or restarts skips to the round its neighbours are at.
    async fn join_current_round(&mut self) {
        if self.partners.is_empty() {
            return;
        }
        let until = Instant::now() + JOIN_WAIT;
        while Instant::now() < until {
            let heard = self.partners.iter().all(|p| self.peers.contains_key(p));
            if heard && !self.partners.is_empty() {
                break;
            }
            self.serve_until(Instant::now() + Duration::from_millis(100))
                .await;
        }
        let ahead = self
            .peers
            .iter()
            .filter(|(n, v)| self.partners.contains(*n) && !v.done)
            .map(|(_, v)| v.round)
            .max();
        if let Some(round) = ahead.filter(|&r| r > self.round) {
            tracing::info!(
                from = self.round,
                to = round,
                "joining the federation's round"
            );
            self.round = round;
        }
    }

    async fn run_round(&mut self) -> anyhow::Result<()> {
        let round = self.round;
        let round_start = Instant::now();
        self.counters = Counters::default();
        self.metrics.training.round.set(round as i64);
        self.announce(false).await;

        let start: Vec<Tensor> = self.trainable_params().iter().map(|t| t.copy()).collect();
        // A misbehaving node distorts its change over this round's training.
        let model_before: Option<Vec<Tensor>> = self
            .config
            .node_spec
            .misbehaviour
            .map(|_| self.all_params().iter().map(|t| t.copy()).collect());
        let steps = self.config.federation_spec.local_steps;
        let stats = self
            .blocking(move |local| local.trainer.train_steps(&local.train, steps))
            .await??;
        let training_seconds = stats.seconds;
        let training = &self.metrics.training;
        training.duration.observe(training_seconds);
        training.samples.inc_by(stats.samples);
        training.train_loss.set(stats.mean_loss);

        let waiting_from = Instant::now();
        self.exchange(round, model_before.as_deref()).await;
        let waiting_seconds = waiting_from.elapsed().as_secs_f64();
        self.metrics.exchange.waiting.observe(waiting_seconds);

        let (used, stale) = self.aggregate(round);
        let mut params = self.trainable_params();
        self.momentum.apply(&start, &mut params);
        let exchange = &self.metrics.exchange;
        exchange.updates_used.inc_by(used as u64);
        exchange.dropped("stale", stale as u64);
        self.metrics
            .convergence
            .update_norm
            .set(update_norm(&start, &params));

        let every = self.config.federation_spec.evaluation.every_rounds.max(1);
        let rounds = self.config.federation_spec.rounds;
        let evaluation_from = Instant::now();
        let eval = if round % every == 0 || round == rounds {
            Some(self.blocking(evaluate).await?)
        } else {
            None
        };
        let evaluation_seconds = evaluation_from.elapsed().as_secs_f64();
        let all: Vec<Tensor> = self.all_params();
        let consensus = self.gossip.consensus_distance(&all);
        self.save_checkpoint()?;
        if let Some(e) = &eval {
            self.metrics.training.test_accuracy.set(e.accuracy);
            self.metrics.training.test_loss.set(e.loss);
        }
        if let Some(distance) = consensus {
            self.metrics.convergence.consensus_distance.set(distance);
        }
        let round_seconds = round_start.elapsed().as_secs_f64();
        self.metrics.exchange.round_duration.observe(round_seconds);

        *self.counters.updates_dropped.entry("stale").or_default() += stale as u64;
        let record = RoundRecord {
            node: self.config.name.clone(),
            round,
            train_loss: stats.mean_loss,
            test_accuracy: eval.as_ref().map(|e| e.accuracy),
            test_loss: eval.as_ref().map(|e| e.loss),
            learning_rate: self.trainer().learning_rate(),
            bytes_sent: self.counters.bytes_sent,
            bytes_received: self.counters.bytes_received,
            peers_connected: self.connected.len(),
            updates_received: self.counters.updates_received,
            updates_used: used as u64,
            updates_dropped: self.counters.updates_dropped.values().sum(),
            dropped_by_reason: self
                .counters
                .updates_dropped
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            round_seconds,
            training_seconds,
            waiting_seconds,
            evaluation_seconds,
            consensus_distance: consensus,
        };
        self.emit(NodeEvent::Round(record));
        self.round += 1;
        Ok(())
    }

    /// Sends this round's update to every live partner and waits for theirs, until all
    /// have arrived or the deadline passes.
    /// `round_start` is the model before this round's training, kept only by a
    /// misbehaving node.
    async fn exchange(&mut self, round: u64, round_start: Option<&[Tensor]>) {
        let until = Instant::now() + self.deadline;
        let mut params = self.all_params();
        if let (Some(misbehaviour), Some(start)) = (self.config.node_spec.misbehaviour, round_start)
        {
            params = misbehaviour::corrupt(misbehaviour, &params, start);
        }
        let frame = self.gossip.prepare(&params, round, self.encoding);
        let mut sends: JoinSet<(String, Result<Ack, network::NetworkError>, usize)> =
            JoinSet::new();
        for peer in self.live_partners() {
            self.spawn_send(&mut sends, peer, frame.clone());
        }

        loop {
            let waiting_for: Vec<String> = self
                .live_partners()
                .into_iter()
                .filter(|p| {
                    let e = self.gossip.neighbours.get(p);
                    !e.is_some_and(|e| e.in_sync && e.last_round.is_some_and(|r| r >= round))
                })
                .collect();
            if (waiting_for.is_empty() && sends.is_empty()) || self.stop.load(Ordering::Relaxed) {
                break;
            }
            let now = Instant::now();
            if now >= until {
                tracing::warn!(round, missing = ?waiting_for, "round deadline passed");
                *self.counters.updates_dropped.entry("deadline").or_default() +=
                    waiting_for.len() as u64;
                self.metrics
                    .exchange
                    .dropped("deadline", waiting_for.len() as u64);
                break;
            }
            // Wake at least every 200 ms to notice a stop request.
            let wake = until.min(now + Duration::from_millis(200));
            tokio::select! {
                Some(joined) = sends.join_next(), if !sends.is_empty() => {
                    if let Ok((peer, result, bytes)) = joined {
                        self.finish_send(&mut sends, round, peer, result, bytes);
                    }
                }
                event = self.events.recv() => match event {
                    Some(event) => self.handle_event(event).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // Sends still in flight belong to partners that never answered in time; their
        // requests time out on their own and are counted then or forgotten.
        sends.abort_all();
    }

    fn spawn_send(
        &mut self,
        sends: &mut JoinSet<(String, Result<Ack, network::NetworkError>, usize)>,
        peer: String,
        frame: Vec<u8>,
    ) {
        let handle = self.network.clone();
        let timeout = self.deadline;
        sends.spawn(async move {
            let bytes = frame.len();
            let result = match tokio::time::timeout(timeout, handle.send(&peer, frame)).await {
                Ok(result) => result,
                Err(_) => Err(network::NetworkError::Send {
                    peer: peer.clone(),
                    reason: "timed out".into(),
                }),
            };
            (peer, result, bytes)
        });
    }

    fn finish_send(
        &mut self,
        sends: &mut JoinSet<(String, Result<Ack, network::NetworkError>, usize)>,
        round: u64,
        peer: String,
        result: Result<Ack, network::NetworkError>,
        bytes: usize,
    ) {
        if matches!(result, Ok(Ack::Applied | Ack::NeedKeyframe)) {
            self.metrics.exchange.bytes_sent.inc_by(bytes as u64);
            self.metrics.exchange.updates_sent.inc();
        }
        match result {
            Ok(Ack::Applied) => self.counters.bytes_sent += bytes as u64,
            Ok(Ack::NeedKeyframe) => {
                self.counters.bytes_sent += bytes as u64;
                tracing::info!(%peer, round, "peer lost track of our model: sending a keyframe");
                let keyframe = self.gossip.keyframe(round);
                self.spawn_send(sends, peer, keyframe);
            }
            Ok(Ack::Rejected(reason)) => {
                tracing::warn!(%peer, %reason, "peer rejected our update");
            }
            Err(error) => tracing::warn!(%peer, %error, "update not delivered"),
        }
    }

    /// Mixes with the neighbours' estimates; returns (neighbours used, left out as stale).
    ///
    /// Every partner whose estimate is in step and recent enough takes part, including one
    /// that has just finished or dropped out: its last model is still the best estimate.
    fn aggregate(&mut self, round: u64) -> (usize, usize) {
        let staleness = self.config.federation_spec.exchange.staleness_rounds;
        let oldest = round.saturating_sub(staleness);
        let mut fresh = Vec::new();
        let mut stale = 0;
        for partner in &self.partners {
            let Some(estimate) = self.gossip.neighbours.get(partner) else {
                continue;
            };
            match estimate.last_round {
                Some(r) if estimate.in_sync && r >= oldest => fresh.push(partner.clone()),
                Some(_) => stale += 1,
                None => {}
            }
        }
        let degrees: BTreeMap<String, Option<usize>> = fresh
            .iter()
            .map(|n| (n.clone(), self.peers.get(n).and_then(|p| p.degree)))
            .collect();
        let weights = metropolis_hastings(self.live_degree().max(fresh.len()), &degrees);
        self.metrics.exchange.set_weights(&weights.neighbours);
        let aggregation = &self.config.federation_spec.aggregation;
        let gamma = aggregation.consensus_step;
        let mixing = match aggregation.rule {
            AggregationRule::MetropolisHastings => Mixing::Average,
            AggregationRule::ClippedGossip => Mixing::Clipped {
                factor: aggregation.clip_factor,
            },
        };
        // A misbehaving node keeps training on its own, so that it stays alive and keeps
        // sending for the whole run.
        if self.config.node_spec.misbehaviour.is_some() {
            return (0, stale);
        }
        let mut params = self.all_params();
        let used = self
            .gossip
            .mix(&mut params, &weights, gamma, oldest, mixing);
        (used.len(), stale)
    }

    /// Partners that are connected and still training.
    fn live_partners(&self) -> Vec<String> {
        self.partners
            .iter()
            .filter(|p| self.connected.contains(*p))
            .filter(|p| !self.peers.get(*p).is_some_and(|v| v.done))
            .cloned()
            .collect()
    }

    /// Degree used in the Metropolis-Hastings rule: connected topology neighbours.
    fn live_degree(&self) -> usize {
        self.neighbours
            .iter()
            .filter(|n| self.connected.contains(*n))
            .count()
    }

    fn all_params(&self) -> Vec<Tensor> {
        let local = self
            .local
            .as_ref()
            .expect("the model is only away during blocking work");
        local
            .trainer
            .parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    fn trainable_params(&self) -> Vec<Tensor> {
        let all = self.all_params();
        self.trainable
            .iter()
            .map(|&i| all[i].shallow_clone())
            .collect()
    }

    /// Runs `work` on a blocking thread with the model and data, serving the network
    /// meanwhile.
    async fn blocking<R: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Local) -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let mut local = self
            .local
            .take()
            .expect("the model is only away during blocking work");
        // Training and evaluation take seconds of CPU; on the async runtime they would
        // stall the swarm and leave neighbours' updates unanswered.
        let mut job = tokio::task::spawn_blocking(move || {
            let result = work(&mut local);
            (local, result)
        });
        loop {
            tokio::select! {
                joined = &mut job => {
                    let (local, result) = joined.context("training thread panicked")?;
                    self.local = Some(local);
                    return Ok(result);
                }
                Some(event) = self.events.recv() => self.handle_event(event).await,
            }
        }
    }

    /// Serves network events until `until`.
    async fn serve_until(&mut self, until: Instant) {
        loop {
            tokio::select! {
                Some(event) = self.events.recv() => self.handle_event(event).await,
                _ = tokio::time::sleep_until(until.into()) => return,
            }
        }
    }

    async fn handle_event(&mut self, event: NetworkEvent) {
        match event {
            NetworkEvent::Update { from, frame, reply } => {
                self.counters.bytes_received += frame.len() as u64;
                self.counters.updates_received += 1;
                self.metrics
                    .exchange
                    .bytes_received
                    .inc_by(frame.len() as u64);
                self.metrics.exchange.updates_received.inc();
                let ack = match codec::decode(&frame, &self.layout) {
                    Err(error) => {
                        tracing::warn!(peer = %from, %error, "rejected an update");
                        *self
                            .counters
                            .updates_dropped
                            .entry(error.reason())
                            .or_default() += 1;
                        self.metrics.exchange.dropped(error.reason(), 1);
                        Ack::Rejected(error.reason().to_string())
                    }
                    Ok(update) if update.header.sender != from => {
                        *self.counters.updates_dropped.entry("sender").or_default() += 1;
                        self.metrics.exchange.dropped("sender", 1);
                        Ack::Rejected("sender".into())
                    }
                    Ok(update) => match self.gossip.receive(&from, update) {
                        Received::Applied { .. } => Ack::Applied,
                        Received::NeedKeyframe => Ack::NeedKeyframe,
                        Received::Replayed => {
                            *self.counters.updates_dropped.entry("replayed").or_default() += 1;
                            self.metrics.exchange.dropped("replayed", 1);
                            Ack::Rejected("replayed".into())
                        }
                        Received::WrongModel => {
                            *self
                                .counters
                                .updates_dropped
                                .entry("fingerprint")
                                .or_default() += 1;
                            self.metrics.exchange.dropped("fingerprint", 1);
                            Ack::Rejected("fingerprint".into())
                        }
                    },
                };
                let _ = self.network.respond(reply, ack).await;
            }
            NetworkEvent::Presence(p) => {
                let view = self.peers.entry(p.node.clone()).or_default();
                view.round = p.round;
                view.degree = Some(p.degree);
                view.done = p.done;
            }
            NetworkEvent::Connected(peer) => {
                self.connected.insert(peer.clone());
                self.metrics.exchange.set_connected(&peer, true);
                self.update_peering();
                self.emit(NodeEvent::PeerConnected {
                    node: self.config.name.clone(),
                    peer,
                    round: self.round,
                });
            }
            NetworkEvent::Disconnected(peer) => {
                self.connected.remove(&peer);
                self.metrics.exchange.set_connected(&peer, false);
                self.update_peering();
                self.emit(NodeEvent::PeerDisconnected {
                    node: self.config.name.clone(),
                    peer,
                    round: self.round,
                });
            }
            NetworkEvent::StrangerRefused => {
                self.counters.strangers_refused += 1;
                self.metrics.exchange.dropped("stranger", 1);
            }
        }
    }

    /// Keeps the connected-peers gauge and readiness in step with `connected`.
    fn update_peering(&self) {
        self.metrics
            .exchange
            .peers_connected
            .set(self.connected.len() as i64);
        let peered = self.partners.is_empty() || !self.connected.is_empty();
        self.metrics
            .readiness
            .peered
            .store(peered, Ordering::Relaxed);
    }

    async fn announce(&mut self, done: bool) {
        let presence = Presence {
            node: self.config.name.clone(),
            round: self.round,
            degree: self.live_degree(),
            done,
        };
        let _ = self.network.announce(presence).await;
    }

    /// After the last round, keeps answering partners still finishing theirs, so that
    /// their final exchange does not wait out the deadline, then leaves.
    async fn linger(&mut self) {
        self.round = self.round.min(self.config.federation_spec.rounds);
        self.announce(true).await;
        let until = Instant::now() + self.deadline;
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            if self.live_partners().is_empty() {
                break;
            }
            self.serve_until(Instant::now() + Duration::from_millis(200))
                .await;
        }
        self.emit(NodeEvent::Finished {
            node: self.config.name.clone(),
            round: self.round,
        });
    }

    fn emit(&self, event: NodeEvent) {
        if let Some(hook) = &self.hook {
            hook(&event);
        }
        if let Ok(line) = serde_json::to_string(&event) {
            println!("{line}");
        }
    }
}

async fn load_data(
    config: &NodeConfig,
    me: &config::MemberConfig,
) -> anyhow::Result<(Dataset, Dataset)> {
    let spec = config::dataset_spec(&config.node_spec);
    let channels = me.model.in_channels;
    let group: Vec<String> = {
        let mut g: Vec<String> = config
            .members
            .iter()
            .filter(|m| m.dataset_key == me.dataset_key)
            .map(|m| m.name.clone())
            .collect();
        g.sort();
        g
    };
    let index = group.iter().position(|n| *n == me.name).unwrap_or(0);
    let fed = &config.federation_spec;
    let partition = match &fed.partition {
        PartitionSpec::Iid => partition::Partition::Iid,
        PartitionSpec::Dirichlet {
            alpha,
            min_per_node,
        } => partition::Partition::Dirichlet {
            alpha: *alpha,
            min_per_node: *min_per_node as usize,
        },
    };
    let seed = fed.seed;
    let test_limit = fed.evaluation.test_limit as usize;
    let nodes = group.len();
    // Decoding tens of thousands of images is blocking work.
    tokio::task::spawn_blocking(move || -> anyhow::Result<(Dataset, Dataset)> {
        let full = data::load(&spec, Split::Train)
            .with_context(|| format!("loading training data from {}", spec.path.display()))?;
        let shares = partition::split(&full.labels_vec(), nodes, partition, seed)?;
        let train = full.subset(&shares[index]).with_channels(channels)?;
        let mut test = data::load(&spec, Split::Test)
            .with_context(|| format!("loading test data from {}", spec.path.display()))?
            .with_channels(channels)?;
        if test_limit > 0 && test_limit < test.len() {
            test = test.evenly_spaced(test_limit);
        }
        tracing::info!(
            share = index,
            of = nodes,
            train = train.len(),
            test = test.len(),
            "data loaded"
        );
        Ok((train, test))
    })
    .await?
}

/// L2 norm of the change from `before` to `after`, over all tensors together.
fn update_norm(before: &[Tensor], after: &[Tensor]) -> f64 {
    // A measurement, not part of training: no autograd graph.
    tch::no_grad(|| {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| (a - b).square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt()
    })
}

fn train_config(config: &NodeConfig) -> TrainConfig {
    let fed = &config.federation_spec;
    let momentum = match fed.optimizer.kind {
        ApiOptimizer::Adam => 0.9,
        ApiOptimizer::Sgd => 0.9,
    };
    let rounds = match fed.optimizer.schedule {
        LrSchedule::Cosine => fed.rounds,
        // A schedule "longer" than any run never decays noticeably.
        LrSchedule::Constant => fed.rounds * 1_000_000,
    };
    TrainConfig {
        batch_size: fed.batch_size as usize,
        local_steps: fed.local_steps,
        rounds,
        optimizer: OptimizerConfig {
            kind: match fed.optimizer.kind {
                ApiOptimizer::Adam => OptimizerKind::Adam,
                ApiOptimizer::Sgd => OptimizerKind::Sgd,
            },
            learning_rate: fed.optimizer.learning_rate,
            weight_decay: fed.optimizer.weight_decay,
            momentum,
            clip_grad_norm: fed.optimizer.clip_grad_norm,
        },
        warmup_steps: fed.optimizer.warmup_steps,
        augment: config::input_channels(&config.node_spec) == 3,
        seed: fed.seed,
    }
}

fn trainable_indices(trainer: &Trainer, params: &[(String, Tensor)]) -> Vec<usize> {
    let trainable: BTreeSet<String> = trainer
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect();
    params
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| trainable.contains(n))
        .map(|(i, _)| i)
        .collect()
}

/// Batches that re-estimate batch-norm statistics before each evaluation.
const BATCH_NORM_BATCHES: usize = 50;

/// Evaluates the node's model on its test split, batch-norm statistics first re-estimated
/// on its training split for the weights the round's average left. An Akida-class model is
/// scored by the integer engine on its export, re-quantised from the current weights: the
/// accuracy the chip would give (the loss stays the quantisation-aware float model's).
fn evaluate(local: &mut Local) -> EvalReport {
    local
        .trainer
        .recalibrate_batch_norm(&local.train, BATCH_NORM_BATCHES);
    let mut report = local.trainer.evaluate(&local.test);
    if local.trainer.spec.architecture == model::Architecture::AkidaCnn {
        match akida::evaluate(&local.trainer, &local.test) {
            Ok(accuracy) => {
                tracing::debug!(
                    float = report.accuracy,
                    integer = accuracy,
                    "akida accuracy"
                );
                report.accuracy = accuracy;
            }
            Err(error) => tracing::warn!(%error, "cannot score the integer export; float kept"),
        }
    }
    report
}

/// Every member's model as this node sees it, by member name. Members of the same kind
/// share one model, built once on the CPU to read its parameters.
fn member_models(config: &NodeConfig) -> BTreeMap<String, ModelShapes> {
    let mut built: Vec<(config::MemberModel, ModelShapes)> = Vec::new();
    let mut models = BTreeMap::new();
    for member in &config.members {
        let known = built.iter().find(|(m, _)| *m == member.model);
        let shapes = match known {
            Some((_, shapes)) => shapes.clone(),
            None => {
                let spec = config::model_spec(&member.model);
                let vs = nn::VarStore::new(tch::Device::Cpu);
                let _model = model::Cnn::new(&vs.root(), spec);
                let mut params: Vec<(String, Vec<i64>)> = vs
                    .variables()
                    .into_iter()
                    .map(|(n, t)| (n, t.size()))
                    .collect();
                params.sort();
                let shapes = ModelShapes {
                    fingerprint: model::fingerprint(spec.architecture, &vs),
                    params,
                };
                built.push((member.model, shapes.clone()));
                shapes
            }
        };
        models.insert(member.name.clone(), shapes);
    }
    models
}

fn start_network(
    config: &NodeConfig,
    max_frame: usize,
    deadline: Duration,
    send_delay: Option<Duration>,
) -> anyhow::Result<(NetworkHandle, mpsc::Receiver<NetworkEvent>)> {
    let key_bytes = std::fs::read(&config.key_file)
        .with_context(|| format!("reading identity key {}", config.key_file.display()))?;
    let keypair = identity::Keypair::from_protobuf_encoding(&key_bytes)
        .with_context(|| format!("identity key {} is not valid", config.key_file.display()))?;
    let own_id = keypair.public().to_peer_id();
    let mut members = Vec::new();
    for m in config.members.iter().filter(|m| m.name != config.name) {
        let id: PeerId = m
            .peer_id
            .parse()
            .with_context(|| format!("member {}: peerId {:?} is not valid", m.name, m.peer_id))?;
        let addresses = m
            .addresses
            .iter()
            .map(|a| a.parse::<Multiaddr>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("member {}: an address is not a multiaddress", m.name))?;
        members.push(Peer {
            name: m.name.clone(),
            id,
            addresses,
            dial: m.neighbour,
        });
    }
    if let Some(me) = config.me() {
        if me.peer_id != own_id.to_string() {
            bail!(
                "key file {} is not the identity {} the member list gives this node",
                config.key_file.display(),
                me.peer_id
            );
        }
    }
    let listen: Multiaddr = config
        .listen
        .parse()
        .with_context(|| format!("listen address {:?} is not a multiaddress", config.listen))?;
    let net_config = network::NetworkConfig {
        keypair,
        listen,
        federation: config.federation.clone(),
        members,
        max_frame,
        request_timeout: deadline,
        send_delay,
    };
    let presence = Presence {
        node: config.name.clone(),
        round: 0,
        degree: 0,
        done: false,
    };
    let (handle, events, _task) = network::spawn(net_config, presence)?;
    Ok((handle, events))
}
