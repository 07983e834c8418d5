#!/bin/bash
# The README's first command on a machine with stable Rust only (issue 19): builds `firma` with
# a CARGO_HOME and PATH that have cargo, rustc and rustup but no bpf-linker (rustup adds
# CARGO_HOME/bin to the PATH of what it runs, so a PATH alone is not enough; the registry is
# the real one, linked, so nothing is downloaded), so firma-sidecar/build.rs cannot
# build the eBPF object and must embed the committed firma-ebpf/prebuilt/firma-ebpf.bpf.o, then
# runs `firma run -- curl …` with that binary (firma/tests/run_command.rs, in a fresh network
# namespace with a local stand-in for paste.rs) and expects the 403 summary. Root.
#
# It reuses the normal target directory: FIRMA_EBPF_PREBUILT=0 (a value the build script
# watches, meaning "not forced") makes cargo rerun the build script, so only firma-sidecar and
# firma are recompiled. The binary is copied to target/fresh-machine/firma before the test
# build puts the normal one back.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
REAL_HOME=${CARGO_HOME:-$HOME/.cargo}
FAKE=$(mktemp -d)
trap 'rm -rf "$FAKE"' EXIT
mkdir "$FAKE/bin"
for tool in cargo rustc rustup; do
  ln -s "$(command -v "$tool")" "$FAKE/bin/$tool"
done
for d in registry git; do
  [ -e "$REAL_HOME/$d" ] && ln -s "$REAL_HOME/$d" "$FAKE/$d"
done
if PATH="$FAKE/bin:/usr/bin:/bin" command -v bpf-linker >/dev/null; then
  echo "bpf-linker is still on the restricted PATH ($(PATH="$FAKE/bin:/usr/bin:/bin" command -v bpf-linker))" >&2
  exit 1
fi
LOG=$(mktemp)
env -u FIRMA_EBPF_REQUIRED CARGO_HOME="$FAKE" PATH="$FAKE/bin:/usr/bin:/bin" FIRMA_EBPF_PREBUILT=0 \
  cargo build -p firma --bin firma 2>&1 | tee "$LOG"
if ! grep -q "embedding the committed eBPF object" "$LOG"; then
  echo "the build did not fall back to the committed eBPF object" >&2
  exit 1
fi
mkdir -p "$TARGET/fresh-machine"
cp "$TARGET/debug/firma" "$TARGET/fresh-machine/firma"
FIRMA_BIN="$TARGET/fresh-machine/firma" \
  cargo test -p firma --test run_command -- --exact curl_allowed_with_injection_and_denied_with_403
echo "fresh-machine check: built without bpf-linker, embedded the committed object, firma run enforced"
