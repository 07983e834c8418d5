"""grpcio client for the gRPC end-to-end tests.

usage: client.py STUBS_DIR TARGET CA_PEM [KEY=VALUE]
Calls Unary, Stream (3 replies) and Admin on TARGET (host:port) over TLS trusting CA_PEM
(the proxy, if any, comes from grpc_proxy/https_proxy as grpcio reads them), sending the
optional KEY=VALUE as metadata on every call. Prints one JSON object: per call
{code, details, replies, trailers}.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
from firma_test import echo_pb2, echo_pb2_grpc  # noqa: E402

target, ca = sys.argv[2], sys.argv[3]
metadata = [tuple(sys.argv[4].split("=", 1))] if len(sys.argv) > 4 else []
with open(ca, "rb") as f:
    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
channel = grpc.secure_channel(target, creds)
stub = echo_pb2_grpc.EchoStub(channel)
out = {}


def call(name, fn):
    try:
        replies, trailers = fn()
        out[name] = {"code": "OK", "details": "", "replies": replies, "trailers": trailers}
    except grpc.RpcError as e:
        out[name] = {
            "code": e.code().name,
            "details": e.details(),
            "replies": [],
            "trailers": {k: v for k, v in (e.trailing_metadata() or ())},
        }


def reply(r):
    return {"message": r.message, "authorization": r.authorization, "index": r.index}


def unary():
    r, c = stub.Unary.with_call(echo_pb2.EchoRequest(message="hello"), timeout=10, metadata=metadata)
    return [reply(r)], {k: v for k, v in c.trailing_metadata()}


def stream():
    it = stub.Stream(echo_pb2.EchoRequest(message="tick", count=3), timeout=10, metadata=metadata)
    replies = [reply(r) for r in it]
    return replies, {k: v for k, v in it.trailing_metadata()}


def admin():
    r, c = stub.Admin.with_call(echo_pb2.EchoRequest(message="root"), timeout=10, metadata=metadata)
    return [reply(r)], {k: v for k, v in c.trailing_metadata()}


call("unary", unary)
call("stream", stream)
call("admin", admin)
print(json.dumps(out))
