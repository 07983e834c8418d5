#!/bin/bash
# The README's first command on a machine with stable Rust only: builds `firma` with
# a RUSTUP_HOME that holds only the stable toolchain (linked to the real one, so nothing is
# downloaded and the build cache stays valid), so firma-sidecar/build.rs finds no nightly, cannot
# build the eBPF object and must embed the committed firma-ebpf/prebuilt/firma-ebpf.bpf.o; then
# runs `firma run -- curl …` with that binary (firma/tests/run_command.rs, in a fresh network
# namespace with a local stand-in for paste.rs) and expects the 403 summary. Root.
#
# It reuses the normal target directory: FIRMA_EBPF_PREBUILT=0 (a value the build script
# watches, meaning "not forced") makes cargo rerun the build script, so only firma-sidecar and
# firma are recompiled. The binary is copied to target/fresh-machine/firma before the test
# build puts the normal one back. (A CARGO_HOME without bpf-linker would do too, but moving the
# registry's path makes cargo rebuild every dependency.)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
REAL=${RUSTUP_HOME:-$HOME/.rustup}
HOST=$(rustc -vV | sed -n 's/^host: //p')
FAKE=$(mktemp -d)
trap 'rm -rf "$FAKE"' EXIT
mkdir "$FAKE/toolchains"
ln -s "$REAL/toolchains/stable-$HOST" "$FAKE/toolchains/stable-$HOST"
printf 'version = "12"\ndefault_toolchain = "stable-%s"\n' "$HOST" >"$FAKE/settings.toml"
if RUSTUP_HOME="$FAKE" rustup run nightly rustc -V >/dev/null 2>&1; then
  echo "nightly is still reachable with RUSTUP_HOME=$FAKE" >&2
  exit 1
fi
LOG=$(mktemp)
env -u FIRMA_EBPF_REQUIRED -u RUSTUP_TOOLCHAIN RUSTUP_HOME="$FAKE" FIRMA_EBPF_PREBUILT=0 \
  cargo build -p firma --bin firma 2>&1 | tee "$LOG"
if ! grep -q "embedding the committed eBPF object" "$LOG"; then
  echo "the build did not fall back to the committed eBPF object" >&2
  exit 1
fi
mkdir -p "$TARGET/fresh-machine"
cp "$TARGET/debug/firma" "$TARGET/fresh-machine/firma"
FIRMA_BIN="$TARGET/fresh-machine/firma" \
  cargo test -p firma --test run_command -- --exact curl_allowed_with_injection_and_denied_with_403
echo "fresh-machine check: built without nightly (so no eBPF toolchain), embedded the committed object, firma run enforced"
