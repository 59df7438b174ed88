//! Puts libtorch's library folder on the runtime search path of every binary of this crate,
//! and records libtorch's version for the node's build-info metric.
//!
//! torch-sys links libtorch but leaves no rpath on the final executables, so without this
//! they would only start with LD_LIBRARY_PATH set. torch-sys reports the folder it linked
//! against (it declares `links = "tch"`), which keeps this right for a provisioned
//! `.libtorch/`, a user's own LIBTORCH and LIBTORCH_USE_PYTORCH alike.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // Release archives of libtorch carry their version beside `lib/`; a PyTorch wheel
        // does not, and the node then reports the version tch requires.
        if let Some(root) = Path::new(&dir).parent() {
            let file = root.join("build-version");
            println!("cargo:rerun-if-changed={}", file.display());
            if let Ok(text) = std::fs::read_to_string(&file) {
                let version = text.trim();
                if !version.is_empty() && !version.contains(char::is_whitespace) {
                    println!("cargo:rustc-env=EDGESYNC_LIBTORCH_VERSION={version}");
                }
            }
        }
    }
}
