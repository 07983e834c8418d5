"""A hostile etcd client: HTTP/2 keep-alive pings every second on a connection with no open
stream, which etcd's keep-alive policy answers with GOAWAY "too_many_pings". Used by
firma/tests/scale_audit.rs to check that the etcd fixture's logs show that answer (so their
absence, asserted after the Firma etcd tests, means something). Usage: etcd_ping_flood.py
HOST:PORT; exits after 60 s at most."""
import sys
import time

import grpc

channel = grpc.insecure_channel(sys.argv[1], options=[
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_time_between_pings_ms", 1000),
])
grpc.channel_ready_future(channel).result(timeout=10)
# One Range call (key "foo") opens the connection; then the channel idles and pings.
rng = channel.unary_unary("/etcdserverpb.KV/Range",
                          request_serializer=lambda b: b, response_deserializer=lambda b: b)
rng(b"\x0a\x03foo", timeout=5)
print("connected", flush=True)
time.sleep(60)
