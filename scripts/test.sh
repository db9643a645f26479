#!/usr/bin/env bash
# Sets up (idempotently) and runs every check and test: formatting, clippy, the kernel object
# build, the Rust tests (kernel tests included: they need root), the capture on other kernels
# in VMs (`cargo xtask kernels`), and the Python client tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh

step() { printf '\n==> %s\n' "$*"; }

# A CI run builds everything once: incremental caches would only take disk (about 2 GiB).
[[ -n "${CI:-}" ]] && export CARGO_INCREMENTAL=0
step "disk"
df -h . /tmp

step "format"
cargo fmt --all --check
step "kernel object"
cargo xtask build-ebpf
step "clippy (kernel programs)"
cargo xtask clippy-ebpf
step "clippy"
cargo clippy --all-targets --locked -- -D warnings
step "build"
cargo build --locked
step "Rust tests"
cargo test --locked
step "kernels in VMs: Debian 11's 5.10, Debian 12's 6.1 and 6.12"
cargo xtask kernels 5.10 6.1 6.12
step "a kernel that cannot load the programs is reported as such (lockdown=confidentiality)"
cargo xtask kernels 6.1 --append lockdown=confidentiality --expect-failure lockdown
step "a VM that gives no result in time is stopped and reported, not waited on"
cargo xtask kernels 6.1 --timeout 5 --expect-failure "no result within 5 s"
step "Python client tests"
OBSERVER_BIN="$PWD/target/debug/observer" .venv/bin/python -m pytest -q tests/python
step "disk used"
du -sh target
