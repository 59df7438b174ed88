//! EdgeSync's custom resources, shared by the node (which runs them locally) and the operator
//! (which reconciles them into pods), and the configuration a node process reads
//! ([`node_config`]), which both the local launcher and the operator write.
//!
//! Both kinds are namespaced: a federation's pods, Secrets and ConfigMaps live in a
//! namespace, owner references may only point within one, and namespaces let several teams
//! run federations on one cluster without seeing each other's resources.

mod federation;
mod manifest;
mod node;
pub mod node_config;
mod ranges;
mod schema;

pub use federation::*;
pub use manifest::{Manifest, ManifestError};
pub use node::*;
pub use ranges::OutOfRange;

/// API group of every EdgeSync resource.
pub const GROUP: &str = "edgesync.dev";
/// API version of every EdgeSync resource.
pub const VERSION: &str = "v1alpha1";
