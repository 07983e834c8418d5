#!/usr/bin/env bash
# Runs the commands the README and docs/ present as runnable and checks their key output lines,
# so a documented command cannot rot unnoticed (.ci/run calls this after the tests). Root.
#
#   scripts/check-documented.sh            # all of them
#   scripts/check-documented.sh seed demo  # a selection: seed, demo, quickstart, bench
#
# What runs, and in which mode (docs/operations.md, "Documented commands in CI"):
#   seed        bash scripts/seed-flows.sh, as documented (debug firma).
#   demo        cargo xtask demo, as documented.
#   quickstart  the README's quick start (firma init, authority -c, sidecar -c, curl through
#               the proxy, audit verify), verbatim but inside a fresh network namespace so its
#               fixed ports cannot collide with the machine's and nothing leaves.
#   bench       cargo xtask bench --smoke: the load harness end to end on debug binaries for one
#               short repetition (figures meaningless; the release run is `cargo xtask bench`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export FIRMA=${FIRMA:-$TARGET/debug/firma}
LOGS=$(mktemp -d /tmp/firma-documented.XXXXXX)
failures=()

# expect LOG PATTERN...: every extended regex must match a line of LOG.
expect() {
    local log=$1; shift
    local p
    for p in "$@"; do
        if ! grep -Eq -- "$p" "$log"; then
            echo "    MISSING in $(basename "$log"): /$p/" >&2
            return 1
        fi
    done
}

# check NAME PATTERNS... -- COMMAND...: runs COMMAND, then expects each pattern in its output.
check() {
    local name=$1; shift
    local patterns=()
    while [[ $1 != -- ]]; do patterns+=("$1"); shift; done
    shift
    local log=$LOGS/$name.log
    printf '\n==> %s: %s\n' "$name" "$*"
    local rc=0
    "$@" >"$log" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "    FAILED (exit $rc); last lines:" >&2
        tail -n 40 "$log" | sed 's/^/    | /' >&2
        failures+=("$name")
        return 0
    fi
    if ! expect "$log" "${patterns[@]}"; then
        tail -n 60 "$log" | sed 's/^/    | /' >&2
        failures+=("$name")
        return 0
    fi
    echo "    ok ($(wc -l <"$log") lines of output, log $log)"
}

# The quick start runs below as the README shows it (with the debug binary, in a namespace);
# this fails when the README's block no longer holds the commands run here.
readme_quickstart_matches() {
    local block
    block=$(awk '/^## Quick start/{q=1} q&&/^```sh/{f=1;next} f&&/^```/{exit} f' "$ROOT/README.md")
    local want
    for want in \
        'firma init /tmp/firma' \
        'firma authority -c /tmp/firma/firma.toml &' \
        'firma sidecar -c /tmp/firma/firma.toml &' \
        'curl --proxy http://127.0.0.1:8080 --cacert /tmp/firma/firma-ca/firma-ca.crt' \
        'https://paste.rs/ -d hi' \
        'firma audit verify /tmp/firma/audit.jsonl --public-key /tmp/firma/audit.pub'; do
        if ! grep -qF -- "$want" <<<"$block"; then
            echo "README.md's quick start no longer contains: $want" >&2
            return 1
        fi
    done
    echo "README quick start: holds every command the quickstart check runs"
}

quickstart() {
    # The README's quick start, in its own network and mount namespace.
    if [[ -z "${FIRMA_QUICKSTART_IN_NETNS:-}" ]]; then
        FIRMA_QUICKSTART_IN_NETNS=1 exec unshare --net --mount -- "$0" quickstart-inner
    fi
}

quickstart_inner() {
    ip link set lo up
    # Globals: the EXIT trap runs after this function's locals are gone.
    QS_DIR=$(mktemp -d /tmp/firma-quickstart.XXXXXX)
    rmdir "$QS_DIR"
    QS_PIDS=()
    trap 'for p in "${QS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$QS_DIR"' EXIT
    local dir=$QS_DIR
    "$FIRMA" init "$dir"
    "$FIRMA" authority -c "$dir/firma.toml" >"$dir/authority.log" 2>&1 &
    QS_PIDS+=($!)
    "$FIRMA" sidecar -c "$dir/firma.toml" >"$dir/sidecar.log" 2>&1 &
    QS_PIDS+=($!)
    for _ in $(seq 1 300); do
        grep -q "sidecar ready" "$dir/sidecar.log" 2>/dev/null && break
        kill -0 "${QS_PIDS[1]}" 2>/dev/null || { cat "$dir/sidecar.log"; return 1; }
        sleep 0.1
    done
    grep -q "sidecar ready" "$dir/sidecar.log" || { cat "$dir/authority.log" "$dir/sidecar.log"; return 1; }
    echo "curl:"
    curl -sS --proxy http://127.0.0.1:8080 --cacert "$dir/firma-ca/firma-ca.crt" \
        https://paste.rs/ -d hi -w '\nHTTP %{http_code}\n'
    # Drain the sidecar so the decision is in the file, then verify the chain.
    kill -TERM "${QS_PIDS[1]}"
    wait "${QS_PIDS[1]}" || true
    "$FIRMA" audit verify "$dir/audit.jsonl" --public-key "$dir/audit.pub"
}

run_selected() {
    local sel=("$@")
    [[ ${#sel[@]} -gt 0 ]] || sel=(seed demo quickstart bench)
    for s in "${sel[@]}"; do
        case $s in
        seed)
            check seed-flows \
                'HTTP 200' \
                'upstream_saw.*Bearer sk-openai-from-env' \
                'PolicyDenied.*paste\.rs' \
                'api\.openai\.com/v1/chat/completions -> 200 .*sk-openai-from-vault' \
                'api\.acme-vendor\.com/v1/messages -> 200 .*acme-from-vault' \
                'without a capability -> 403 .*CapabilityNotFound' \
                'ALLOW .*outcome=upstream 200' \
                'OK: .* every signature and chain link verifies' \
                -- bash scripts/seed-flows.sh
            if grep -q Traceback "$LOGS/seed-flows.log"; then
                echo "    a Python traceback in seed-flows output" >&2
                failures+=(seed-flows-traceback)
            fi
            ;;
        demo)
            check demo \
                'upstream_saw_authorization": "Bearer sk-firma-injected' \
                'PolicyDenied' \
                'ALLOW .*credential_injected=true' \
                'DENY PolicyDenied' \
                'OK: .* every signature and chain link verifies' \
                'removed /firma-demo' \
                -- cargo xtask demo
            if grep -q $'\033' "$LOGS/demo.log"; then
                echo "    ANSI escapes in the demo's log (not a terminal)" >&2
                failures+=(demo-ansi)
            fi
            ;;
        quickstart)
            check quickstart \
                '^  firma\.toml +the config' \
                '"reason":"PolicyDenied"' \
                'HTTP 403' \
                'OK: .* every signature and chain link verifies' \
                -- "$0" quickstart-netns
            check quickstart-is-the-readmes 'README quick start' -- readme_quickstart_matches
            ;;
        bench)
            check bench-smoke \
                'direct, keep-alive' \
                'firma http_proxy' \
                'firma transparent +keep-alive' \
                -- cargo xtask bench --smoke
            ;;
        *)
            echo "unknown selection $s (seed, demo, quickstart, bench)" >&2
            exit 2
            ;;
        esac
    done
}

case "${1:-}" in
quickstart-netns) quickstart; exit 1 ;;
quickstart-inner) quickstart_inner; exit $? ;;
esac

[[ $EUID -eq 0 ]] || { echo "check-documented.sh needs root (demo, namespaces)" >&2; exit 1; }
[[ -x "$FIRMA" ]] || { echo "no firma binary at $FIRMA: cargo build -p firma first" >&2; exit 1; }
run_selected "$@"
if [[ ${#failures[@]} -gt 0 ]]; then
    echo "documented commands FAILED: ${failures[*]} (logs in $LOGS)" >&2
    exit 1
fi
echo "documented commands: all passed (logs in $LOGS)"
