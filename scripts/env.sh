# Sourced by the scripts: the tool paths the build needs (SPEC §2).
export PATH="$HOME/.cargo/bin:$PATH:/usr/lib/llvm-22/bin"
export LIBRARY_PATH="/usr/lib/llvm-22/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
