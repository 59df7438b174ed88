//! EdgeSync custom resource types.
