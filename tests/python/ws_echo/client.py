"""WebSocket client (the `websockets` package, sync API) for firma/tests/websocket_e2e.rs.

usage: client.py URL CA_PEM [PROXY_URL]
Connects (through PROXY_URL when given, else directly), sends three messages with its own
`Authorization: Bearer agent-own-key` (and `x-firma-capability: $FIRMA_TEST_CAPABILITY` when
that is set), reads the echoes and closes. Prints one JSON object:
{"status": 101, "echoes": [...]} or, when the upgrade is refused, {"status", "body"}.
"""
import json
import os
import ssl
import sys

from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

url, ca = sys.argv[1], sys.argv[2]
proxy = sys.argv[3] if len(sys.argv) > 3 else None
ctx = ssl.create_default_context(cafile=ca)
headers = {"Authorization": "Bearer agent-own-key"}
if os.environ.get("FIRMA_TEST_CAPABILITY"):
    headers["x-firma-capability"] = os.environ["FIRMA_TEST_CAPABILITY"]
try:
    with connect(
        url,
        ssl=ctx,
        proxy=proxy,
        additional_headers=headers,
        open_timeout=30,  # a loaded CI machine; a deny answers at once
        compression=None,  # byte counts in the audit stay predictable
    ) as ws:
        echoes = []
        for m in ["ping-1", "ping-2", "x" * 5000]:
            ws.send(m)
            echoes.append(ws.recv(timeout=10))
    print(json.dumps({"status": 101, "echoes": echoes}))
except InvalidStatus as e:
    r = e.response
    print(json.dumps({"status": r.status_code, "body": r.body.decode(errors="replace")}))
