//! `cfg(root)` for the tests that need root, as `observer/build.rs` sets it: when this build
//! runs as root (effective uid 0), or in CI (`CI` set), where such a test must run and fail
//! without root rather than be left out. They are marked
//! `#[cfg_attr(not(root), ignore = "needs root")]`, so a build without root reports them
//! ignored, not passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(root)");
    // A switch of user (sudo sets SUDO_UID) rebuilds with the new answer.
    for variable in ["USER", "SUDO_UID", "CI"] {
        println!("cargo::rerun-if-env-changed={variable}");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root || std::env::var_os("CI").is_some() {
        println!("cargo::rustc-cfg=root");
    }
}
