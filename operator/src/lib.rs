//! The EdgeSync operator turns `FederationRound` and `DflNode` resources into running node
//! pods on a K3s edge cluster.
//!
//! Each controller is a short pipeline: observe what exists, validate the spec (pure), build
//! the desired objects (pure), apply them with server-side apply, and write status. The pure
//! steps are tested on their output; the others against a mock API server.
//!
//! - [`federation`]: the `FederationRound` controller, which owns every object of a run;
//! - [`dflnode`]: the `DflNode` controller, which checks a device's spec on its own and
//!   reports what a node process cannot report itself (a pod that failed or cannot start);
//! - [`validate`], [`identity`], [`node_config`], [`names`]: the pure pieces both share;
//! - [`leader`], [`metrics`], [`web`], [`telemetry`]: running as a service;
//! - [`crd`] and [`render`]: the CRDs, and a run's objects, as YAML without a cluster.

pub mod apply;
pub mod context;
pub mod crd;
pub mod dflnode;
pub mod error;
pub mod federation;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod node_config;
pub mod operator;
pub mod render;
pub mod settings;
pub mod telemetry;
pub mod validate;
pub mod web;

pub use error::Error;
pub use operator::run;
pub use settings::{NodePodSettings, RunArgs};
