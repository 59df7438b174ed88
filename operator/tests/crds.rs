//! The committed CRD files must be what `edgesync-operator crd` generates from the current
//! Rust types; a difference means someone changed the types without regenerating them.

use std::path::Path;

const FILES: [&str; 2] = [
    "crds/edgesync.dev_crds.yaml",
    "charts/edgesync/crds/edgesync.dev_crds.yaml",
];

#[test]
fn committed_crds_match_the_rust_types() {
    let generated = edgesync_operator::crd::crds_yaml().expect("CRDs render");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in FILES {
        let path = root.join(file);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            committed == generated,
            "{file} is stale: regenerate it with \
             `cargo run -p edgesync-operator -- crd > {file}`"
        );
    }
}
