//! Decentralized federation: nodes that train locally, exchange compressed model
//! differences with their neighbours over libp2p and gossip-average with
//! Metropolis-Hastings weights.
//!
//! - [`alignment`]: which parameters members of different architectures share;
//! - [`codec`]: the update wire format and its validation;
//! - [`gossip`]: neighbour estimates and the compressed gossip step (CHOCO-SGD);
//! - [`mixing`]: Metropolis-Hastings weights;
//! - [`momentum`]: momentum on round updates;
//! - [`misbehaviour`]: corrupted models for robustness experiments;
//! - [`network`]: the libp2p swarm task;
//! - [`runner`]: one node's round loop (`dfl-node run`);
//! - [`launcher`]: a whole federation as local processes (`dfl-node local`);
//! - [`report`]: per-round records, CSV and plots.

pub mod alignment;
pub mod codec;
pub mod config;
pub mod gossip;
pub mod launcher;
pub mod misbehaviour;
pub mod mixing;
pub mod momentum;
pub mod network;
pub mod report;
pub mod runner;
