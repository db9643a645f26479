#!/usr/bin/env bash
# Sets up (idempotently), builds, and runs `observer demo`: a simulated Ollama, a gateway (nginx),
# the observer (eBPF mode when `observer check` passes, else proxy mode) and simulated chat users,
# with a live summary in the terminal and Prometheus metrics on http://127.0.0.1:9464/metrics
# until Ctrl-C. Arguments go to `observer demo` (e.g. `--duration 60s`, `--mode proxy`).
#
# Fast on a fresh machine: the kernel object is committed (observer/bpf/), so only nginx is
# installed and only the debug build runs (a release build takes twice as long). When the kernel
# sources have changed since the object was committed, it sets up the kernel toolchain and
# builds the object first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --demo
source scripts/env.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! cargo build --locked --bin observer 2>&1 | tee "$log"; then
    grep -q "kernel object" "$log" || exit 1
    echo "demo: the committed kernel object does not match the kernel sources; building it"
    bash scripts/setup.sh
    cargo xtask build-ebpf
    cargo build --locked --bin observer
fi
rm -f "$log"
trap - EXIT
exec ./target/debug/observer demo "$@"
