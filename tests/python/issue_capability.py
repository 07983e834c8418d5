"""Python gRPC client for the Firma Authority, written like the "Deploy a GenAI web app" guide.

Usage: issue_capability.py STUBS_DIR ADDR [CA_CERT]

STUBS_DIR holds the `firma_proto` package generated from proto/authority.proto with
`python3 -m grpc_tools.protoc`. Prints one JSON object: the allowed capability's raw token and
id, the denial for a forbidden action class, and the first streamed bundle's version.
Exits non-zero on any unexpected answer.
"""

import json
import os
import sys

stubs = sys.argv[1]
sys.path.insert(0, stubs)
# The generated *_grpc module imports its sibling as a top-level module.
sys.path.insert(0, os.path.join(stubs, "firma_proto"))

import grpc  # noqa: E402
from firma_proto import authority_pb2, authority_pb2_grpc  # noqa: E402


class IssuanceDenied(PermissionError):
    """PermissionError (as in the guide) that also carries the deciding policies and code."""

    def __init__(self, denied):
        super().__init__(denied.reason)
        self.reason = denied.reason
        self.policies = list(denied.policies)
        self.code = denied.code


def channel(addr, ca_path):
    if ca_path:
        with open(ca_path, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.secure_channel(addr, creds)
    return grpc.insecure_channel(addr)


def issue_capability_for_session(stub, tenant_id, user_session_id, actions):
    req = authority_pb2.IssuanceRequest(
        agent_id=f"tenant-{tenant_id}",
        session_id=user_session_id,
        requested_actions=actions,
        resource_scope="*",
        requested_ttl_seconds=900,  # 15 minutes
    )
    resp = stub.IssueCapability(req, timeout=10)
    if resp.HasField("denied"):
        raise IssuanceDenied(resp.denied)
    return resp.allowed


def main():
    addr = sys.argv[2]
    ca_path = sys.argv[3] if len(sys.argv) > 3 else None
    stub = authority_pb2_grpc.AuthorityStub(channel(addr, ca_path))

    allowed = issue_capability_for_session(
        stub, "acme", "user-session-42",
        ["model.inference.chat", "communication.external.send"],
    )
    try:
        issue_capability_for_session(stub, "acme", "user-session-42", ["payment.transfer"])
        print("payment.transfer was NOT denied", file=sys.stderr)
        sys.exit(3)
    except PermissionError as e:
        reason, policies, code = e.reason, e.policies, e.code

    bundles = stub.StreamPolicyBundles(
        authority_pb2.BundleStreamRequest(sidecar_id="python-test"), timeout=10
    )
    first_bundle = next(iter(bundles))
    bundles.cancel()

    print(json.dumps({
        "raw_token": allowed.raw_token,
        "token_id": allowed.token_id,
        "agent_id": allowed.agent_id,
        "action_set": list(allowed.action_set),
        "denied_reason": reason,
        "denied_policies": policies,
        "denied_code": code,
        "bundle_version": first_bundle.version,
        "bundle_files": [p.name for p in first_bundle.policies],
    }))


if __name__ == "__main__":
    main()
