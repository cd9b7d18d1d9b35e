//! Lets the nnmesh binaries find libtorch without the user exporting
//! anything: torch-sys tells us where it linked libtorch from (its `links`
//! metadata), and we bake that directory into the rpath.
//!
//! On CUDA builds, `libtorch_cuda.so` registers the CUDA backend in a static
//! initializer but no symbol of it is referenced, so `--as-needed` linkers drop
//! it and tch sees no GPU. Link it explicitly.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
