"""WebSocket upgrade through an HTTP proxy with the client's bytes cut a chosen way, for
firma/tests/websocket_e2e.rs (the sidecar's buffer handovers: CONNECT head, sniffed
ClientHello, TLS, request head, framing guard).

usage: segmented_client.py URL CA_PEM PROXY_URL MODE
MODE: `coalesce`  the TLS Finished and the whole GET in one TCP write;
      `split`     the GET one byte per TLS record and TCP write;
      `pipelined` the GET and a second request in one TLS record.
Prints one JSON object: {"status", "head", "body", "after"} where `after` is everything the
server sent behind the first response until it closed (must be empty: one answer only).
"""
import json
import socket
import ssl
import sys
import time
from urllib.parse import urlparse

url, ca, proxy, mode = sys.argv[1:5]
u, p = urlparse(url), urlparse(proxy)
host, port = u.hostname, u.port or 443
path = u.path + ("?" + u.query if u.query else "")

s = socket.create_connection((p.hostname, p.port), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
reply = b""
while b"\r\n\r\n" not in reply:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit("proxy closed before answering CONNECT")
    reply += chunk
if not reply.startswith(b"HTTP/1.1 200"):
    sys.exit(f"CONNECT refused: {reply!r}")

# TLS through memory BIOs: the test decides how the records are cut into TCP writes.
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ssl.create_default_context(cafile=ca).wrap_bio(incoming, outgoing, server_hostname=host)
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        if outgoing.pending:
            s.sendall(outgoing.read())
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("closed during the TLS handshake")
        incoming.write(chunk)

request = (
    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()
if mode == "coalesce":
    tls.write(request)
    s.sendall(outgoing.read())  # the client Finished is still queued: one write for both
elif mode == "split":
    s.sendall(outgoing.read())
    for b in request:
        tls.write(bytes([b]))
        s.sendall(outgoing.read())
elif mode == "pipelined":
    tls.write(request + f"GET /second HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    s.sendall(outgoing.read())
else:
    sys.exit(f"unknown mode {mode}")

# Read until the server closes (a refusal closes the connection) or the first response is
# complete and nothing more comes.
data, deadline = b"", time.monotonic() + 30
s.settimeout(1)
while time.monotonic() < deadline:
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        head, sep, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 101") and sep:
            break
        continue
    except ConnectionResetError:
        break
    if not chunk:
        break
    incoming.write(chunk)
    try:
        while True:
            d = tls.read(65536)
            if not d:
                break
            data += d
    except ssl.SSLWantReadError:
        pass
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        break
head, _, rest = data.partition(b"\r\n\r\n")
length = 0
for line in head.split(b"\r\n")[1:]:
    name, _, value = line.partition(b":")
    if name.strip().lower() == b"content-length":
        length = int(value.strip())
status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
print(
    json.dumps(
        {
            "status": status,
            "head": head.decode(errors="replace"),
            "body": rest[:length].decode(errors="replace"),
            "after": rest[length:].decode(errors="replace"),
        }
    )
)
