//! Puts libtorch's library folder on the fuzz binaries' runtime search path, as node/build.rs
//! does for the node's own binaries: torch-sys links libtorch but leaves no rpath, and
//! `cargo fuzz run` starts the binary without LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
