"""Python gRPC client for the Authority's admin `Revoke` RPC.

Usage: revoke.py STUBS_DIR ADDR TOKEN_ID

STUBS_DIR holds the `firma_proto` package generated from proto/authority.proto with
`python3 -m grpc_tools.protoc`. The admin token is read from FIRMA_ADMIN_TOKEN; when that
variable is unset no `authorization` metadata is sent. Prints one JSON object:
`{"ok": true, "added": BOOL}` or `{"ok": false, "code": "UNAUTHENTICATED", "details": "..."}`.
"""

import json
import os
import sys

stubs, addr, token_id = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, stubs)
# The generated *_grpc module imports its sibling as a top-level module.
sys.path.insert(0, os.path.join(stubs, "firma_proto"))

import grpc  # noqa: E402
from firma_proto import authority_pb2, authority_pb2_grpc  # noqa: E402

token = os.environ.get("FIRMA_ADMIN_TOKEN")
metadata = [("authorization", f"Bearer {token}")] if token is not None else []
with grpc.insecure_channel(addr) as ch:
    stub = authority_pb2_grpc.AuthorityStub(ch)
    try:
        r = stub.Revoke(authority_pb2.RevokeRequest(token_id=token_id), metadata=metadata, timeout=10)
        print(json.dumps({"ok": True, "added": r.added}))
    except grpc.RpcError as e:
        print(json.dumps({"ok": False, "code": e.code().name, "details": e.details()}))
