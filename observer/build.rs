//! Embeds the kernel object built by `cargo xtask build-ebpf`, or else the one committed under
//! `observer/bpf/`, and refuses to build with a missing or stale one: the stamp beside the
//! object must match the kernel sources on disk.

#[path = "../xtask/src/ebpf_object.rs"]
mod ebpf_object;
#[path = "../xtask/src/root_cfg.rs"]
mod root_cfg;

use std::path::Path;

fn main() {
    root_cfg::mark_root_only_tests();
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let workspace = Path::new(&manifest)
        .parent()
        .expect("observer lives inside the workspace");
    // The object's profile follows the userspace build's.
    let profile = if std::env::var("PROFILE").as_deref() == Ok("release") {
        "release"
    } else {
        "debug"
    };
    let object = ebpf_object::object_path(workspace, profile);
    let stamp = ebpf_object::stamp_path(workspace, profile);
    let flag = if profile == "release" {
        " --release"
    } else {
        ""
    };

    for input in ebpf_object::input_roots(workspace) {
        println!("cargo::rerun-if-changed={}", input.display());
    }
    let committed = ebpf_object::committed_object(workspace);
    let committed_stamp = ebpf_object::committed_stamp(workspace);
    for path in [&object, &stamp, &committed, &committed_stamp] {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");

    let expected = match ebpf_object::fingerprint(workspace) {
        Ok(fingerprint) => fingerprint,
        Err(err) => fail(&format!("cannot read the kernel sources: {err}")),
    };
    let current = |object: &Path, stamp: &Path| {
        object.is_file()
            && std::fs::read_to_string(stamp).is_ok_and(|found| found.trim() == expected)
    };
    // A freshly built object first; else the committed one, when it matches the sources.
    let object = if current(&object, &stamp) {
        object
    } else if current(&committed, &committed_stamp) {
        committed
    } else {
        match std::fs::read_to_string(&stamp) {
            Ok(_) => fail(&format!(
                "the kernel object is stale (its sources changed): run `cargo xtask build-ebpf{flag}`"
            )),
            Err(_) => fail(&format!(
                "no kernel object yet: run `cargo xtask build-ebpf{flag}`"
            )),
        }
    };
    println!("cargo::rustc-env=OBSERVER_BPF_OBJECT={}", object.display());
}

fn fail(message: &str) -> ! {
    println!("cargo::error={message}");
    // Cargo fails the build on `cargo::error`; exiting 0 keeps its output to that one line.
    std::process::exit(0)
}
