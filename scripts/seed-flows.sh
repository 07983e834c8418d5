#!/usr/bin/env bash
# The seeds' http_proxy flows, end to end on loopback (no root needed):
#   A. "Inject credentials" (seed 001): basic mode, a capability seed file, curl --proxy.
#   B. "Deploy a GenAI web app" (seed 000): vault mode against a real Vault-API server
#      (RustyVault), no seed files: the app issues a per-session capability over gRPC with the
#      guide's Python client and hands it to the sidecar in `x-firma-capability`.
# A local HTTPS server plays api.openai.com / api.acme-vendor.com / paste.rs and echoes the
# credential header it receives. Everything started is stopped on exit.
#
# Environment: FIRMA (default target/debug/firma), RVAULT (default: rvault on PATH).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FIRMA=${FIRMA:-$ROOT/target/debug/firma}
RVAULT=${RVAULT:-$(command -v rvault || echo "$HOME/.cargo/bin/rvault")}
export NO_COLOR=1
unset NO_PROXY no_proxy
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy
step() { printf '\n==> %s\n' "$*"; }
show() { printf '    $ %s\n' "$*"; }
DIR=$(mktemp -d /tmp/firma-seeds.XXXXXX)
PIDS=()
SIDECARS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
wait_for() { # FILE TEXT
    for _ in $(seq 1 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1" >&2
    cat "$1" >&2
    exit 1
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port); AUTH=$(port); PROXY_A=$(port); PROXY_B=$(port); VAULT=$(port)

step "keys and a local upstream CA in $DIR"
"$FIRMA" authority generate-key -o "$DIR/authority.key" >/dev/null
"$FIRMA" authority generate-key -o "$DIR/audit.key" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -keyout "$DIR/up-ca.key" \
    -out "$DIR/up-ca.crt" -subj "/CN=seed upstream CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$DIR/up.key" -out "$DIR/up.csr" \
    -subj "/CN=api.openai.com" 2>/dev/null
printf 'subjectAltName=DNS:api.openai.com,DNS:api.acme-vendor.com,DNS:api.anthropic.com,DNS:paste.rs\nextendedKeyUsage=serverAuth\n' >"$DIR/up.ext"
openssl x509 -req -in "$DIR/up.csr" -CA "$DIR/up-ca.crt" -CAkey "$DIR/up-ca.key" -CAcreateserial -days 1 \
    -out "$DIR/up.crt" -extfile "$DIR/up.ext" 2>/dev/null
: >"$DIR/revocations.txt"

python3 - "$DIR/up.crt" "$DIR/up.key" "$UP" >"$DIR/upstream.log" 2>&1 <<'PY' &
import http.server, json, ssl, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def reply(self):
        n = int(self.headers.get("content-length") or 0)
        if n: self.rfile.read(n)
        seen = {h: self.headers.get(h) for h in ("authorization", "x-api-key") if self.headers.get(h)}
        print(f"[upstream] {self.headers.get('host')} {self.command} {self.path} {seen}", flush=True)
        out = json.dumps({"ok": True, "upstream_saw": seen}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out))); self.end_headers(); self.wfile.write(out)
    do_GET = do_POST = reply
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), Echo)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("[upstream] listening", flush=True); srv.serve_forever()
PY
PIDS+=($!)
wait_for "$DIR/upstream.log" listening

common_sidecar() { # PROXY_PORT NAME
    cat <<TOML
[sidecar.interceptor]
mode = "http_proxy"
listen_addr = "127.0.0.1:$1"
drain_timeout_secs = 2
[sidecar.interceptor.https_mitm]
enabled = true
intercept_hosts = ["api.openai.com", "api.acme-vendor.com", "api.anthropic.com", "paste.rs"]
strict_hosts = ["api.acme-vendor.com"]
[sidecar.ca]
dir = "$DIR/ca"
[sidecar.mapping]
rules_path = "$ROOT/policies/mapping-rules.toml"
default_protected = true
[sidecar.authority]
public_key_path = "$DIR/authority.pub"
[sidecar.connector]
default_timeout_ms = 5000
extra_root_certs = ["$DIR/up-ca.crt"]
[[sidecar.connector.hosts]]
host = "api.openai.com"
address = "127.0.0.1:$UP"
rps = 100
burst = 20
[[sidecar.connector.hosts]]
host = "api.acme-vendor.com"
address = "127.0.0.1:$UP"
[[sidecar.connector.hosts]]
host = "api.anthropic.com"
address = "127.0.0.1:$UP"
[[sidecar.connector.hosts]]
host = "paste.rs"
address = "127.0.0.1:$UP"
[sidecar.audit]
sink = "file"
path = "$DIR/audit-$2.jsonl"
signing_key_path = "$DIR/audit.key"
TOML
}

cat >"$DIR/authority.toml" <<TOML
[authority]
listen_addr = "127.0.0.1:$AUTH"
policy_dir = "$ROOT/policies/runtime/genai-app"
issuance_policy_dir = "$ROOT/policies/issuance/genai-app"
revocation_file = "$DIR/revocations.txt"
key_file = "$DIR/authority.key"
max_ttl_seconds = 3600
bundle_ttl_seconds = 30
TOML

step "A. seed 001 (basic mode): issue a capability seed for tenant-acme / session-001"
show "firma authority -c firma.toml issue --agent-id tenant-acme --session-id session-001 --action model.inference.chat --action communication.external.send --resource-scope '*' --ttl-seconds 3600 --output capability.toml"
"$FIRMA" authority -c "$DIR/authority.toml" issue --agent-id tenant-acme --session-id session-001 \
    --action model.inference.chat --action communication.external.send --resource-scope '*' \
    --ttl-seconds 3600 --output "$DIR/capability.toml" 2>&1 | sed 's/^/    /'
{
    cat "$DIR/authority.toml"
    common_sidecar "$PROXY_A" basic
    cat <<TOML
[sidecar.policy]
dir = "$ROOT/policies/runtime/genai-app"
[sidecar.capability_seed]
paths = ["$DIR/capability.toml"]
[[sidecar.credentials]]
host = "api.openai.com"
mode = "basic"
header = "Authorization"
value_from_env = "OPENAI_API_KEY"
prefix = "Bearer "
[[sidecar.credentials]]
host = "api.anthropic.com"
mode = "basic"
header = "x-api-key"
value_from_env = "ANTHROPIC_API_KEY"
TOML
} >"$DIR/firma-basic.toml"
show "OPENAI_API_KEY=sk-... ANTHROPIC_API_KEY=sk-ant-... firma sidecar -c firma.toml"
OPENAI_API_KEY=sk-openai-from-env ANTHROPIC_API_KEY=sk-ant-from-env \
    "$FIRMA" sidecar -c "$DIR/firma-basic.toml" >"$DIR/sidecar-basic.log" 2>&1 &
PIDS+=($!); SIDECARS+=($!)
wait_for "$DIR/sidecar-basic.log" "sidecar ready"
grep -E "seeded|listening|sidecar ready" "$DIR/sidecar-basic.log" | sed -E 's/^[^ ]+ +//; s/^/    /'
for req in "GET https://api.openai.com/v1/models" "POST https://api.anthropic.com/v1/messages" \
           "POST https://paste.rs/"; do
    set -- $req
    show "curl --proxy http://127.0.0.1:$PROXY_A --cacert ca/firma-ca.crt -X $1 $2"
    curl -sS --proxy "http://127.0.0.1:$PROXY_A" --cacert "$DIR/ca/firma-ca.crt" -X "$1" "$2" \
        -d '{}' -H 'content-type: application/json' -w '\n    HTTP %{http_code}\n' | sed 's/^{/    {/'
done

step "B. seed 000 (vault mode, per-session capabilities over gRPC)"
if [[ ! -x "$RVAULT" ]]; then
    echo "    SKIP: rvault (RustyVault) not installed: cargo install rusty_vault"
    exit 0
fi
mkdir -p "$DIR/vault/data"
printf 'storage "file" {\n  path = "%s"\n}\nlistener "tcp" {\n  address = "127.0.0.1:%s"\n  tls_disable = true\n}\napi_addr = "http://127.0.0.1:%s"\nlog_level = "warn"\n' \
    "$DIR/vault/data" "$VAULT" "$VAULT" >"$DIR/vault/config.hcl"
(cd "$DIR/vault" && exec "$RVAULT" server --config="$DIR/vault/config.hcl" >/dev/null 2>&1) &
PIDS+=($!)
VA=http://127.0.0.1:$VAULT
for _ in $(seq 1 100); do curl -s "$VA/v1/sys/seal-status" >/dev/null && break; sleep 0.1; done
INIT=$(curl -sS -X PUT "$VA/v1/sys/init" -d '{"secret_shares":1,"secret_threshold":1}')
TOKEN=$(echo "$INIT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["root_token"])')
KEY=$(echo "$INIT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"][0])')
curl -sS -X PUT "$VA/v1/sys/unseal" -d "{\"key\":\"$KEY\"}" >/dev/null
curl -sS -H "X-Vault-Token: $TOKEN" -X POST "$VA/v1/secret/data/openai/api-key" -d '{"value":"sk-openai-from-vault"}'
curl -sS -H "X-Vault-Token: $TOKEN" -X POST "$VA/v1/secret/data/acme-vendor/api-key" -d '{"value":"acme-from-vault"}'
echo "    RustyVault on $VA: secrets at secret/data/openai/api-key and secret/data/acme-vendor/api-key"
"$FIRMA" authority -c "$DIR/authority.toml" >"$DIR/authority.log" 2>&1 &
PIDS+=($!)
wait_for "$DIR/authority.log" "authority ready"
sed -E 's/^[^ ]+ +//; s/^/    /' "$DIR/authority.log"
{
    cat "$DIR/authority.toml"
    common_sidecar "$PROXY_B" vault
    cat <<TOML
[sidecar.policy]
authority_url = "http://127.0.0.1:$AUTH"
[sidecar.capability_seed]
paths = []
[[sidecar.credentials]]
host = "api.openai.com"
mode = "vault"
header = "Authorization"
prefix = "Bearer "
secret_path = "secret/data/openai/api-key"
secret_key = "value"
[[sidecar.credentials]]
host = "api.acme-vendor.com"
mode = "vault"
header = "x-api-key"
secret_path = "secret/data/acme-vendor/api-key"
secret_key = "value"
[sidecar.credentials.vault]
addr = "$VA"
token = "$TOKEN"
TOML
} >"$DIR/firma-vault.toml"
"$FIRMA" sidecar -c "$DIR/firma-vault.toml" >"$DIR/sidecar-vault.log" 2>&1 &
PIDS+=($!); SIDECARS+=($!)
wait_for "$DIR/sidecar-vault.log" "sidecar ready"
grep -E "connected to authority|listening|sidecar ready" "$DIR/sidecar-vault.log" | sed -E 's/^[^ ]+ +//; s/^/    /'
mkdir -p "$DIR/py"
python3 -m grpc_tools.protoc -I "$ROOT/proto" --python_out="$DIR/py" --grpc_python_out="$DIR/py" "$ROOT/proto/authority.proto"
show "python3 app.py   # the guide's issue_capability_for_session(), then requests through the proxy"
PYTHONPATH="$DIR/py" AUTH="127.0.0.1:$AUTH" HTTPS_PROXY="http://127.0.0.1:$PROXY_B" \
    SSL_CERT_FILE="$DIR/ca/firma-ca.crt" REQUESTS_CA_BUNDLE="$DIR/ca/firma-ca.crt" python3 - <<'PY' 2>&1 | sed 's/^/    /'
import os, grpc, requests, authority_pb2, authority_pb2_grpc
def issue_capability_for_session(tenant_id, user_session_id, actions):
    stub = authority_pb2_grpc.AuthorityStub(grpc.insecure_channel(os.environ["AUTH"]))
    resp = stub.IssueCapability(authority_pb2.IssuanceRequest(
        agent_id=f"tenant-{tenant_id}", session_id=user_session_id, requested_actions=actions,
        resource_scope="*", requested_ttl_seconds=900))
    if resp.HasField("denied"):
        raise PermissionError(resp.denied.reason)
    return resp.allowed.raw_token
try:
    issue_capability_for_session("acme", "sess-x", ["payment.transfer"])
except PermissionError as e:
    print(f"payment.transfer refused at issuance: {e}")
token = issue_capability_for_session("acme", "user-session-42",
                                     ["model.inference.chat", "communication.external.send"])
print(f"issued per-session capability {token[:24]}...")
s = requests.Session()  # HTTPS_PROXY and SSL_CERT_FILE come from the environment, as in the guide
s.headers["x-firma-capability"] = token
for url in ["https://api.openai.com/v1/chat/completions", "https://api.acme-vendor.com/v1/messages",
            "https://paste.rs/"]:
    r = s.post(url, json={"model": "gpt-4", "messages": []})
    print(f"POST {url} -> {r.status_code} {r.text}")
r = requests.post("https://api.openai.com/v1/chat/completions", json={})
print(f"same call without a capability -> {r.status_code} {r.text}")
PY
echo "    upstream saw:"
grep '^\[upstream\] api' "$DIR/upstream.log" | sed 's/^/      /'

step "audit: decisions, and the signed chains verify"
# Stop the sidecars first: SIGTERM drains, and every outcome is in the file once they exit.
for p in "${SIDECARS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${SIDECARS[@]}"; do wait "$p" 2>/dev/null || true; done
for f in "$DIR"/audit-*.jsonl; do
    echo "    $(basename "$f"):"
    python3 - "$f" <<'PY'
import json, sys
# Two kinds of events (docs/architecture.md, audit): a `decision` for every request, and for an
# allowed one an `outcome` once it was sent (upstream status or abort), which names its decision.
# Other kinds (recovery, summaries) are listed by name.
events = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
outcomes = {e["decision_event_id"]: e for e in events if e.get("event") == "outcome"}
for e in events:
    kind = e.get("event")
    if kind == "outcome":
        continue
    if "decision" not in e:
        print(f"    ({kind} event)")
        continue
    d = e["decision"]; i = (e.get("envelope") or {}).get("intent") or {}
    c = e.get("capability") or {}; k = e.get("connector") or {}
    res = i.get("resource") or {}
    o = outcomes.get(e.get("event_id"))
    if o is not None:
        oc = o.get("connector") or {}
        after = oc.get("aborted") or (f"upstream {oc['upstream_status']}" if oc.get("upstream_status") else
                                     ("client gone" if oc.get("client_gone") else "-"))
        injected = oc.get("credential_injected"); source = oc.get("credential_source")
    else:
        after = "-"; injected = k.get("credential_injected"); source = k.get("credential_source")
    print(f"    {d['outcome']:5} {d.get('reason') or '-':20} {i.get('action_class') or '-':28} "
          f"{res.get('host')}{res.get('path') or ''}  agent={c.get('agent_id')} "
          f"session={c.get('session_id')} injected={injected} source={source} outcome={after}")
PY
    "$FIRMA" audit verify "$f" --public-key "$DIR/audit.pub" 2>&1 | sed 's/^/    /'
done
