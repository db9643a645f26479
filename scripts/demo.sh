#!/usr/bin/env bash
# Sets up (idempotently), builds the release binary, reports what this host supports
# (`observer check`), then runs the simulated Ollama upstream in the foreground until Ctrl-C.
# (`observer demo`, with gateway, observer and traffic, replaces the last step when it lands.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo xtask build-ebpf --release
cargo build --release --locked
./target/release/observer check || echo "(eBPF mode is not available here; see above)"
listen=127.0.0.1:11434
if ss -ltnH "sport = :11434" 2>/dev/null | grep -q .; then
    listen=127.0.0.1:0
    echo "port 11434 is taken: the simulator picks a free port"
fi
echo
echo "The simulator prints its address below; then try: curl -N http://ADDRESS/api/chat -d '{\"model\":\"llama3.2:1b\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
exec ./target/release/observer sim --listen "$listen"
