//! EdgeSync node: what runs on one edge device of a decentralized federation.
//!
//! A node loads only the images it holds locally ([`data`]), trains a CNN on them with
//! libtorch ([`model`], [`optim`], [`train`]), evaluates it ([`eval`]) and keeps its progress
//! in crash-safe checkpoints ([`checkpoint`]). The `dfl-node` binary exposes all of it
//! through [`cli`]; a running node reports itself through [`metrics`], served by [`web`],
//! and on a cluster into its `DflNode` status ([`status`]). Fault tests make a node slow
//! or fragile on purpose through [`faults`]. The Akida-class model trains for, exports to
//! and runs as the integer model of a BrainChip AKD1000 through [`akida`].

pub mod akida;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod device;
pub mod eval;
pub mod faults;
pub mod federation;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod status;
pub mod telemetry;
pub mod train;
pub mod web;
