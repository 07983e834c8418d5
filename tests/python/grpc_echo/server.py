"""TLS grpcio server for the gRPC end-to-end tests.

usage: server.py STUBS_DIR BIND_ADDR CERT KEY CALLS_FILE
Prints "LISTENING <port>" once serving; appends one JSON line per call to CALLS_FILE
({"method", "authorization", "te", "message"}) so the test can see what reached it.
"""
import json
import sys
import threading
from concurrent import futures

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
from firma_test import echo_pb2, echo_pb2_grpc  # noqa: E402

bind, cert, key, calls_path = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
lock = threading.Lock()


def record(method, context, request):
    md = dict(context.invocation_metadata())
    with lock, open(calls_path, "a") as f:
        f.write(json.dumps({
            "method": method,
            "authorization": md.get("authorization", ""),
            "message": request.message,
        }) + "\n")
    return md.get("authorization", "")


class Echo(echo_pb2_grpc.EchoServicer):
    def Unary(self, request, context):
        auth = record("Unary", context, request)
        # A trailer the client must receive through the sidecar.
        context.set_trailing_metadata((("x-echo-trailer", "unary-done"),))
        return echo_pb2.EchoReply(message=request.message, authorization=auth)

    def Stream(self, request, context):
        auth = record("Stream", context, request)
        context.set_trailing_metadata((("x-echo-trailer", "stream-done"),))
        for i in range(request.count):
            yield echo_pb2.EchoReply(message=f"{request.message}-{i}", authorization=auth, index=i)

    def Admin(self, request, context):
        record("Admin", context, request)
        return echo_pb2.EchoReply(message="admin")


server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
with open(cert, "rb") as c, open(key, "rb") as k:
    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
port = server.add_secure_port(bind, creds)
server.start()
print(f"LISTENING {port}", file=sys.stderr, flush=True)
server.wait_for_termination()
