//! The node's libp2p swarm, owned by one event-loop task.
//!
//! - Transport: TCP, Noise (every connection is encrypted and authenticated by the peers'
//!   Ed25519 identities) and Yamux.
//! - Admission: an allow list of the federation's members. A connection from any other
//!   identity is refused right after the handshake, before any protocol runs, so a stranger
//!   never gets an update decoded.
//! - Presence: gossipsub on one topic per federation; members announce their round, live
//!   degree and whether they are done, every heartbeat.
//! - Updates: a request-response protocol of our own carrying codec frames; the frame size
//!   limit comes from the model and is checked before the frame is read into memory.
//!
//! The rest of the node talks to the loop through a cloneable [`NetworkHandle`] (commands
//! with `oneshot` replies) and receives [`NetworkEvent`]s on a bounded channel.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Duration;

use async_trait::async_trait;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, gossipsub, identity, noise, request_response, tcp, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const UPDATE_PROTOCOL: StreamProtocol = StreamProtocol::new("/edgesync/update/1");
const COMMAND_QUEUE: usize = 64;
const EVENT_QUEUE: usize = 256;
const REDIAL_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_millis(500);

/// A member of the federation as the network sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub id: PeerId,
    pub addresses: Vec<Multiaddr>,
    /// Whether this node should dial it (topology neighbours); others may still dial us.
    pub dial: bool,
}

pub struct NetworkConfig {
    pub keypair: identity::Keypair,
    pub listen: Multiaddr,
    pub federation: String,
    pub members: Vec<Peer>,
    pub max_frame: usize,
    pub request_timeout: Duration,
    /// An injected fault: every outgoing update waits this long before it is handed to
    /// the swarm (see `crate::faults`).
    pub send_delay: Option<Duration>,
}

/// What a node announces on the presence topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub node: String,
    pub round: u64,
    pub degree: usize,
    pub done: bool,
}

/// The receiver's answer to an update.
#[derive(Debug, Clone, PartialEq)]
pub enum Ack {
    Applied,
    /// The receiver's estimate of the sender is out of step; send a keyframe.
    NeedKeyframe,
    /// Refused, with a fixed reason label.
    Rejected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    #[error("the network task has stopped")]
    Stopped,
    #[error("sending to {peer} failed: {reason}")]
    Send { peer: String, reason: String },
}

pub enum NetworkEvent {
    /// An update frame from a member; answer through [`NetworkHandle::respond`].
    Update {
        from: String,
        frame: Vec<u8>,
        reply: Responder,
    },
    Presence(Presence),
    Connected(String),
    Disconnected(String),
    /// A connection attempt by an identity outside the federation was refused.
    StrangerRefused,
}

/// Where the answer to one inbound update goes.
pub struct Responder(request_response::ResponseChannel<Ack>);

enum Command {
    Send {
        peer: PeerId,
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<Ack, String>>,
    },
    Respond {
        channel: request_response::ResponseChannel<Ack>,
        ack: Ack,
    },
    Announce(Presence),
    Connected(oneshot::Sender<Vec<String>>),
}

/// Cloneable access to the network task.
#[derive(Clone)]
pub struct NetworkHandle {
    commands: mpsc::Sender<Command>,
    names: HashMap<String, PeerId>,
    send_delay: Option<Duration>,
}

impl NetworkHandle {
    /// Sends an update frame to member `peer` and waits for its answer, at most the
    /// configured request timeout.
    pub async fn send(&self, peer: &str, frame: Vec<u8>) -> Result<Ack, NetworkError> {
        let id = *self.names.get(peer).ok_or_else(|| NetworkError::Send {
            peer: peer.to_string(),
            reason: "not a member".into(),
        })?;
        if let Some(delay) = self.send_delay {
            tokio::time::sleep(delay).await;
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Send {
                peer: id,
                frame,
                reply,
            })
            .await
            .map_err(|_| NetworkError::Stopped)?;
        answer
            .await
            .map_err(|_| NetworkError::Stopped)?
            .map_err(|reason| NetworkError::Send {
                peer: peer.to_string(),
                reason,
            })
    }

    pub async fn respond(&self, responder: Responder, ack: Ack) -> Result<(), NetworkError> {
        self.commands
            .send(Command::Respond {
                channel: responder.0,
                ack,
            })
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// Publishes this node's presence now (it is also repeated every heartbeat).
    pub async fn announce(&self, presence: Presence) -> Result<(), NetworkError> {
        self.commands
            .send(Command::Announce(presence))
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    /// Names of the members this node has a live connection to.
    pub async fn connected(&self) -> Result<Vec<String>, NetworkError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Connected(reply))
            .await
            .map_err(|_| NetworkError::Stopped)?;
        answer.await.map_err(|_| NetworkError::Stopped)
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    members: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    presence: gossipsub::Behaviour,
    updates: request_response::Behaviour<UpdateCodec>,
}

/// Length-prefixed frames with a size limit enforced before reading.
#[derive(Clone)]
struct UpdateCodec {
    max_frame: usize,
}

#[async_trait]
impl request_response::Codec for UpdateCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Ack;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "update of {len} bytes exceeds the limit of {}",
                    self.max_frame
                ),
            ));
        }
        let mut frame = vec![0u8; len];
        io.read_exact(&mut frame).await?;
        Ok(frame)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Ack>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await?;
        let mut reason = vec![0u8; head[1] as usize];
        io.read_exact(&mut reason).await?;
        Ok(match head[0] {
            0 => Ack::Applied,
            1 => Ack::NeedKeyframe,
            _ => Ack::Rejected(String::from_utf8_lossy(&reason).into_owned()),
        })
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&(req.len() as u32).to_le_bytes()).await?;
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Ack,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let (tag, reason) = match &res {
            Ack::Applied => (0u8, ""),
            Ack::NeedKeyframe => (1, ""),
            Ack::Rejected(r) => (2, r.as_str()),
        };
        let reason = &reason.as_bytes()[..reason.len().min(255)];
        io.write_all(&[tag, reason.len() as u8]).await?;
        io.write_all(reason).await?;
        io.close().await
    }
}

/// Starts the swarm task. Returns the handle, the event stream and the task.
pub fn spawn(
    config: NetworkConfig,
    own_presence: Presence,
) -> Result<
    (
        NetworkHandle,
        mpsc::Receiver<NetworkEvent>,
        tokio::task::JoinHandle<()>,
    ),
    NetworkError,
> {
    let topic = gossipsub::IdentTopic::new(format!("edgesync/{}/presence", config.federation));
    let mut swarm = build_swarm(&config)?;
    swarm
        .behaviour_mut()
        .presence
        .subscribe(&topic)
        .map_err(|e| NetworkError::Build(e.to_string()))?;
    swarm
        .listen_on(config.listen.clone())
        .map_err(|e| NetworkError::Listen {
            addr: config.listen.clone(),
            reason: e.to_string(),
        })?;

    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let names = config
        .members
        .iter()
        .map(|p| (p.name.clone(), p.id))
        .collect();
    let event_loop = EventLoop {
        swarm,
        topic,
        members: config.members,
        commands: command_rx,
        events: event_tx,
        pending: HashMap::new(),
        connected: HashSet::new(),
        presence: own_presence,
    };
    let task = tokio::spawn(event_loop.run());
    Ok((
        NetworkHandle {
            commands: command_tx,
            names,
            send_delay: config.send_delay,
        },
        event_rx,
        task,
    ))
}

/// Hands an event to the node. A full queue means the node is busy; waiting here applies
/// backpressure to the swarm, which slows the peers' streams rather than growing memory.
async fn emit(events: &mpsc::Sender<NetworkEvent>, event: NetworkEvent) {
    let _ = events.send(event).await;
}

fn build_swarm(config: &NetworkConfig) -> Result<Swarm<Behaviour>, NetworkError> {
    let build = |e: &dyn std::fmt::Display| NetworkError::Build(e.to_string());
    let mut allowed = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
    for member in &config.members {
        allowed.allow_peer(member.id);
    }
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(HEARTBEAT)
        // Federations are small; the defaults assume meshes of a dozen peers.
        .mesh_n_low(1)
        .mesh_n(4)
        .mesh_n_high(8)
        .mesh_outbound_min(0)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .build()
        .map_err(|e| build(&e))?;
    let presence = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(config.keypair.clone()),
        gossip_config,
    )
    .map_err(|e| build(&e))?;
    let updates = request_response::Behaviour::with_codec(
        UpdateCodec {
            max_frame: config.max_frame,
        },
        [(UPDATE_PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(config.request_timeout),
    );

    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| build(&e))?
        .with_dns()
        .map_err(|e| build(&e))?
        .with_behaviour(|_| Behaviour {
            members: allowed,
            presence,
            updates,
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    members: Vec<Peer>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetworkEvent>,
    pending: HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Ack, String>>>,
    connected: HashSet<PeerId>,
    presence: Presence,
}

impl EventLoop {
    async fn run(mut self) {
        let mut redial = tokio::time::interval(REDIAL_EVERY);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    // Every handle is gone: the node is shutting down.
                    None => break,
                },
                event = self.swarm.select_next_some() => self.handle_swarm_event(event).await,
                _ = redial.tick() => self.dial_missing(),
                _ = heartbeat.tick() => self.publish_presence(),
            }
        }
    }

    fn name_of(&self, id: &PeerId) -> Option<String> {
        self.members
            .iter()
            .find(|p| p.id == *id)
            .map(|p| p.name.clone())
    }

    fn dial_missing(&mut self) {
        for member in self.members.iter().filter(|m| m.dial) {
            if self.connected.contains(&member.id) {
                continue;
            }
            for addr in &member.addresses {
                let with_peer = addr.clone().with_p2p(member.id).unwrap_or_else(|a| a);
                if let Err(error) = self.swarm.dial(with_peer) {
                    tracing::debug!(peer = %member.name, %error, "dial failed");
                }
            }
        }
    }

    fn publish_presence(&mut self) {
        let Ok(bytes) = serde_json::to_vec(&self.presence) else {
            return;
        };
        // Publishing fails while no peer is subscribed yet; the next heartbeat retries.
        let _ = self
            .swarm
            .behaviour_mut()
            .presence
            .publish(self.topic.clone(), bytes);
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Send { peer, frame, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .updates
                    .send_request(&peer, frame);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, ack } => {
                // The requester may have timed out and gone; nothing to do then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .updates
                    .send_response(channel, ack);
            }
            Command::Announce(presence) => {
                self.presence = presence;
                self.publish_presence();
            }
            Command::Connected(reply) => {
                let names = self
                    .connected
                    .iter()
                    .filter_map(|id| self.name_of(id))
                    .collect();
                let _ = reply.send(names);
            }
        }
    }

    async fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } => {
                self.connected.insert(peer_id);
                if num_established.get() == 1 {
                    if let Some(name) = self.name_of(&peer_id) {
                        tracing::info!(peer = %name, "peer connected");
                        emit(&self.events, NetworkEvent::Connected(name)).await;
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                if let Some(name) = self.name_of(&peer_id) {
                    tracing::info!(peer = %name, "peer disconnected");
                    emit(&self.events, NetworkEvent::Disconnected(name)).await;
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    tracing::warn!("refused a connection from an identity outside the federation");
                    emit(&self.events, NetworkEvent::StrangerRefused).await;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Presence(gossipsub::Event::Message {
                message,
                ..
            })) => self.handle_presence(message).await,
            SwarmEvent::Behaviour(BehaviourEvent::Updates(event)) => {
                self.handle_update_event(event).await
            }
            _ => {}
        }
    }

    async fn handle_presence(&mut self, message: gossipsub::Message) {
        // Signed messages name their author; only members' announcements count, and only
        // about themselves.
        let Some(author) = message.source.and_then(|id| self.name_of(&id)) else {
            return;
        };
        match serde_json::from_slice::<Presence>(&message.data) {
            Ok(presence) if presence.node == author => {
                emit(&self.events, NetworkEvent::Presence(presence)).await
            }
            _ => tracing::debug!(peer = %author, "ignored a malformed presence message"),
        }
    }

    async fn handle_update_event(&mut self, event: request_response::Event<Vec<u8>, Ack>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let Some(from) = self.name_of(&peer) else {
                        return;
                    };
                    emit(
                        &self.events,
                        NetworkEvent::Update {
                            from,
                            frame: request,
                            reply: Responder(channel),
                        },
                    )
                    .await;
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound update failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    struct Host {
        keypair: identity::Keypair,
        address: Multiaddr,
    }

    impl Host {
        fn new() -> Host {
            Host {
                keypair: identity::Keypair::generate_ed25519(),
                address: format!("/ip4/127.0.0.1/tcp/{}", free_port())
                    .parse()
                    .unwrap(),
            }
        }

        fn as_peer(&self, name: &str, dial: bool) -> Peer {
            Peer {
                name: name.into(),
                id: self.keypair.public().to_peer_id(),
                addresses: vec![self.address.clone()],
                dial,
            }
        }

        fn start(
            &self,
            name: &str,
            members: Vec<Peer>,
        ) -> (NetworkHandle, mpsc::Receiver<NetworkEvent>) {
            let config = NetworkConfig {
                keypair: self.keypair.clone(),
                listen: self.address.clone(),
                federation: "guarded".into(),
                members,
                max_frame: 1 << 16,
                request_timeout: Duration::from_secs(3),
                send_delay: None,
            };
            let presence = Presence {
                node: name.into(),
                round: 0,
                degree: 1,
                done: false,
            };
            let (handle, events, _task) = spawn(config, presence).unwrap();
            (handle, events)
        }
    }

    /// Sends `frame` to `peer` until an attempt returns, at most `attempts` times: the
    /// first may start before the connection is up.
    async fn send(
        handle: &NetworkHandle,
        peer: &str,
        attempts: usize,
    ) -> Result<Ack, NetworkError> {
        let mut result = Err(NetworkError::Stopped);
        for _ in 0..attempts {
            result = handle.send(peer, b"frame".to_vec()).await;
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        result
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stranger_is_refused_at_the_connection_and_nothing_it_sends_arrives() {
        let (guard, member, stranger) = (Host::new(), Host::new(), Host::new());
        // The guard's federation is the guard and the member; the stranger believes the
        // guard is its neighbour.
        let (guard_net, mut guard_events) =
            guard.start("guard", vec![member.as_peer("member", false)]);
        let (member_net, _member_events) =
            member.start("member", vec![guard.as_peer("guard", true)]);
        let (stranger_net, _stranger_events) =
            stranger.start("stranger", vec![guard.as_peer("guard", true)]);

        // The guard answers every frame that reaches it and counts refusals until told to
        // stop.
        let (stop, mut stopped) = oneshot::channel::<()>();
        let guard_task = tokio::spawn(async move {
            let (mut from, mut refused) = (Vec::new(), 0);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    event = guard_events.recv() => match event {
                        Some(NetworkEvent::Update { from: peer, reply, .. }) => {
                            from.push(peer);
                            guard_net.respond(reply, Ack::Applied).await.unwrap();
                        }
                        Some(NetworkEvent::StrangerRefused) => refused += 1,
                        Some(_) => {}
                        None => break,
                    },
                }
            }
            (from, refused)
        });
        let stranger_result = send(&stranger_net, "guard", 5).await;
        // A member's frame arrives and is answered: the guard is listening and working.
        let member_result = send(&member_net, "guard", 10).await;
        stop.send(()).unwrap();
        let (from, refused) = guard_task.await.unwrap();

        assert!(
            member_result.is_ok(),
            "the member's update failed: {member_result:?}"
        );
        assert!(
            stranger_result.is_err(),
            "the stranger's update was answered"
        );
        assert!(refused >= 1, "no refusal was counted");
        assert!(
            from.iter().all(|p| p == "member"),
            "frames arrived from {from:?}"
        );
        assert!(!from.is_empty());
    }
}
