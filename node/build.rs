//! Puts libtorch's library folder on the runtime search path of every binary of this crate.
//!
//! torch-sys links libtorch but leaves no rpath on the final executables, so without this
//! they would only start with LD_LIBRARY_PATH set. torch-sys reports the folder it linked
//! against (it declares `links = "tch"`), which keeps this right for a provisioned
//! `.libtorch/`, a user's own LIBTORCH and LIBTORCH_USE_PYTORCH alike.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
