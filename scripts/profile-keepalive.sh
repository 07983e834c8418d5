#!/bin/bash
# Profiles the optimised sidecar during one scenario of the side-by-side harness
# (docs/benchmarks.md, "Profiling the keep-alive path"). Root, linux-perf installed.
#
#   cargo build --profile profiling -p firma -p firma-bench
#   scripts/profile-keepalive.sh target/profiling/firma /tmp/sidecar.perf
#   perf report -i /tmp/sidecar.perf --children --sort symbol --stdio -g none | head -80
#
# It runs `firma-bench run` (one repetition, builtin upstream, no transparent/peers/metrics
# targets), waits until the direct keep-alive run has finished (the http_proxy one starts
# next), and records the sidecar for 4 s with DWARF call graphs (the `profiling` profile is
# release plus line tables; plain release binaries carry no debuginfo, no frame pointers).
set -euo pipefail
FIRMA=$(realpath "$1"); OUT=$2
if ! readelf -S "$FIRMA" | grep -q '\.debug_line'; then
  echo "$FIRMA has no line tables: build it with cargo build --profile profiling (target/profiling/firma)" >&2
  exit 2
fi
BENCH=$(dirname "$FIRMA")/firma-bench
LOG=$(mktemp)
"$BENCH" run --firma "$FIRMA" --repetitions 1 --upstream builtin --skip-transparent \
  --skip-peers --skip-metrics --issuance-requests 0 --duration-secs 10 >"$LOG" 2>&1 &
BP=$!
until grep -q "direct, keep-alive, firma-bench #1:" "$LOG"; do
  sleep 0.2
  kill -0 "$BP" 2>/dev/null || { cat "$LOG"; exit 1; }
done
sleep 1.5
PID=$(pgrep -f "$FIRMA sidecar" | head -1)
perf record -F 499 --call-graph dwarf,16384 -p "$PID" -o "$OUT" -- sleep 4
wait "$BP"
cat "$LOG"
