//! `cfg(root)` for the tests that need root, shared by the build scripts of `observer` and
//! `xtask` (each includes this file by path).

/// `cfg(root)` when this build runs as root (effective uid 0), or in CI (`CI` set), where a
/// test that needs root must run and fail without it rather than be left out. Tests that need
/// root are marked `#[cfg_attr(not(root), ignore = "needs root")]`: a build without root
/// reports them ignored, not passed.
pub fn mark_root_only_tests() {
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
