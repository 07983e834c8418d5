#!/usr/bin/env bash
# Builds bpf-linker from crates.io against the nightly toolchain's own libLLVM
# (no downloadable release matches the nightly's LLVM; see firma-sidecar/src/ebpf/README.md). Idempotent.
set -euo pipefail
if command -v bpf-linker >/dev/null; then exit 0; fi
rustup component add rust-src --toolchain nightly >/dev/null
SYS=$(rustc +nightly --print sysroot)
LIB=$(ls "$SYS/lib" | grep '^libLLVM\.so' | head -n1)
[ -n "$LIB" ] || { echo "no libLLVM.so in $SYS/lib" >&2; exit 1; }
MAJOR=$(echo "$LIB" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
P=$HOME/.local/share/firma-llvm
mkdir -p "$P/lib"
ln -sf "$SYS/lib/$LIB" "$P/lib/libLLVM.so"
LLVM_PREFIX=$P RUSTFLAGS="-C link-arg=-Wl,-rpath,$SYS/lib" \
  cargo install bpf-linker --no-default-features --features "llvm-$MAJOR"
