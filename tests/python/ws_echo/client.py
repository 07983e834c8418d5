"""WebSocket client (the `websockets` package, asyncio API) for firma/tests/websocket_e2e.rs.

usage: client.py URL CA_PEM [PROXY_URL]
Connects (through PROXY_URL when given, else directly), sends three messages with its own
`Authorization: Bearer agent-own-key` (and `x-firma-capability: $FIRMA_TEST_CAPABILITY` when
that is set), reads the echoes and closes. Prints one JSON object:
{"status": 101, "echoes": [...]} or, when the upgrade is refused, {"status", "body"}.

The asyncio API, not the sync one: the sync client reads the TLS socket on a background thread
while the caller writes to it, and on a loaded machine its upgrade request was sometimes never
written after the TLS handshake (the socket's counters showed the handshake's bytes and
nothing after; the test then timed out waiting for a response to a request never sent).
"""
import asyncio
import json
import os
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


async def main() -> None:
    url, ca = sys.argv[1], sys.argv[2]
    proxy = sys.argv[3] if len(sys.argv) > 3 else None
    ctx = ssl.create_default_context(cafile=ca)
    headers = {"Authorization": "Bearer agent-own-key"}
    if os.environ.get("FIRMA_TEST_CAPABILITY"):
        headers["x-firma-capability"] = os.environ["FIRMA_TEST_CAPABILITY"]
    try:
        async with connect(
            url,
            ssl=ctx,
            proxy=proxy,
            additional_headers=headers,
            open_timeout=30,  # a loaded CI machine; a deny answers at once
            compression=None,  # byte counts in the audit stay predictable
        ) as ws:
            echoes = []
            for m in ["ping-1", "ping-2", "x" * 5000]:
                await ws.send(m)
                echoes.append(await asyncio.wait_for(ws.recv(), 10))
        print(json.dumps({"status": 101, "echoes": echoes}))
    except InvalidStatus as e:
        r = e.response
        print(json.dumps({"status": r.status_code, "body": r.body.decode(errors="replace")}))


asyncio.run(main())
