//! Embeds the kernel object built by `cargo xtask build-ebpf`, and refuses to build with a
//! missing or stale one: the stamp beside the object must match the kernel sources on disk.

#[path = "../xtask/src/ebpf_object.rs"]
mod ebpf_object;

use std::path::Path;

fn main() {
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
    println!("cargo::rerun-if-changed={}", object.display());
    println!("cargo::rerun-if-changed={}", stamp.display());
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");

    let expected = match ebpf_object::fingerprint(workspace) {
        Ok(fingerprint) => fingerprint,
        Err(err) => fail(&format!("cannot read the kernel sources: {err}")),
    };
    match std::fs::read_to_string(&stamp) {
        Ok(found) if found.trim() == expected && object.is_file() => {}
        Ok(_) => fail(&format!(
            "the kernel object is stale (its sources changed): run `cargo xtask build-ebpf{flag}`"
        )),
        Err(_) => fail(&format!(
            "no kernel object yet: run `cargo xtask build-ebpf{flag}`"
        )),
    }
    println!("cargo::rustc-env=OBSERVER_BPF_OBJECT={}", object.display());
}

fn fail(message: &str) -> ! {
    println!("cargo::error={message}");
    // Cargo fails the build on `cargo::error`; exiting 0 keeps its output to that one line.
    std::process::exit(0)
}
