"""Keep-alive connections through the sidecar that go idle long enough to be parked.

Run by firma/tests/idle_parking.rs with: PROXY_URL CA_FILE METRICS_URL. Each scenario opens one
CONNECT tunnel to api.openai.com through the http_proxy listener, makes a first request, waits
until the sidecar reports the connection parked (firma_sidecar_connections_parked), and then
goes on on the same connection. Prints one JSON object with what each scenario saw.

- stdlib: http.client.HTTPSConnection through the tunnel (the standard library's own client):
  request, parked, request, request again at once; the socket is the same throughout.
- split: the next request's head is half sent before the park and finished after it.
- pipelined: two requests in one write after the park.
- smuggle: a head with both Content-Length and Transfer-Encoding after the park.
- eof: the client shuts down its write side while parked.
"""
import http.client
import json
import socket
import ssl
import sys
import time
import urllib.parse
import urllib.request

proxy, ca, metrics = sys.argv[1:4]
p = urllib.parse.urlsplit(proxy)
HOST = "api.openai.com"
no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parked():
    text = no_proxy.open(metrics, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("firma_sidecar_connections_parked "):
            return float(line.split()[1])
    return 0.0


def wait_parked(n=1):
    deadline = time.monotonic() + 30
    while parked() < n:
        if time.monotonic() > deadline:
            raise SystemExit("the connection was never parked")
        time.sleep(0.05)


def wait_unparked():
    deadline = time.monotonic() + 30
    while parked() > 0:
        if time.monotonic() > deadline:
            raise SystemExit("the connection stayed parked")
        time.sleep(0.05)


def tunnel():
    s = socket.create_connection((p.hostname, p.port), timeout=20)
    s.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise SystemExit("proxy closed the CONNECT")
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=ca)
    return ctx.wrap_socket(s, server_hostname=HOST)


def request(step):
    """A GET naming its step in x-step (the upstream records headers, not query strings)."""
    return f"GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nx-step: {step}\r\n\r\n".encode()


def read_response(f):
    """(status, body) of one response read from a buffered reader; None at EOF."""
    line = f.readline()
    if not line:
        return None
    status = int(line.split()[1])
    length = 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        name, _, value = h.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, f.read(length).decode(errors="replace")


def parked_tunnel(step):
    """A tunnel that made one request (`step`) and was parked: (socket, reader, status)."""
    s = tunnel()
    f = s.makefile("rb")
    s.sendall(request(step))
    status = read_response(f)[0]
    wait_parked()
    return s, f, status


def eof_within(sock, secs):
    sock.settimeout(secs)
    try:
        while sock.recv(4096):
            pass
        return True
    except (socket.timeout, ssl.SSLError, OSError):
        return False


out = {}

# stdlib
c = http.client.HTTPSConnection(p.hostname, p.port, context=ssl.create_default_context(cafile=ca), timeout=20)
c.set_tunnel(HOST, 443)
statuses = []
c.request("GET", "/v1/models", headers={"x-step": "n1"})
r = c.getresponse()
r.read()
statuses.append(r.status)
first_sock = c.sock
wait_parked()
for n in (2, 3):
    c.request("GET", "/v1/models", headers={"x-step": f"n{n}"})
    r = c.getresponse()
    r.read()
    statuses.append(r.status)
out["stdlib"] = statuses
out["stdlib_same_socket"] = c.sock is first_sock
c.close()
wait_unparked()

# split
s = tunnel()
f = s.makefile("rb")
s.sendall(request("split1"))
first = read_response(f)
second = request("split2")
s.sendall(second[:20])
wait_parked()
s.sendall(second[20:])
out["split"] = [first[0], read_response(f)[0]]
s.close()
wait_unparked()

# pipelined
s, f, first = parked_tunnel("pipe1")
s.sendall(request("pipe2") + request("pipe3"))
out["pipelined"] = [first, read_response(f)[0], read_response(f)[0]]
s.close()
wait_unparked()

# smuggle
s, f, first = parked_tunnel("smuggle1")
s.sendall(
    f"POST /v1/models HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n"
    "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode()
)
second = read_response(f)
out["smuggle"] = [first, second[0]]
out["smuggle_reason"] = json.loads(second[1]).get("reason")
out["smuggle_closed"] = read_response(f) is None
s.close()
wait_unparked()

# eof
s, f, out["eof_first"] = parked_tunnel("eof1")
# Python's SSLSocket.shutdown drops its TLS state and shuts the TCP write side down: what
# follows is read raw (the sidecar's close_notify, then the EOF).
s.shutdown(socket.SHUT_WR)
out["eof_closed"] = eof_within(s, 10)
wait_unparked()

print(json.dumps(out))
