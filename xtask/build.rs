//! `cfg(root)` for this crate's tests that need root, as `observer/build.rs` sets it.

#[path = "src/root_cfg.rs"]
mod root_cfg;

fn main() {
    root_cfg::mark_root_only_tests();
}
