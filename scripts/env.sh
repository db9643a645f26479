# Sourced by the scripts: the tool paths the build needs (docs/DESIGN.md#build-and-toolchain).
export PATH="$HOME/.cargo/bin:$PATH:/usr/lib/llvm-22/bin"
export LIBRARY_PATH="/usr/lib/llvm-22/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
