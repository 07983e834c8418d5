"""TLS WebSocket echo server (the `websockets` package) for firma/tests/websocket_e2e.rs.

usage: server.py BIND_HOST CERT KEY SESSIONS_FILE
Prints "LISTENING <port>" on stderr once serving. Echoes every message; when a session ends,
appends one JSON line to SESSIONS_FILE: {"path", "authorization", "messages"}.
"""
import asyncio
import json
import ssl
import sys

from websockets.asyncio.server import serve

host, cert, key, sessions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]


async def echo(ws):
    n = 0
    try:
        async for message in ws:
            n += 1
            await ws.send(message)
    finally:
        with open(sessions, "a") as f:
            f.write(json.dumps({
                "path": ws.request.path,
                "authorization": ws.request.headers.get("Authorization", ""),
                "messages": n,
            }) + "\n")


async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    async with serve(echo, host, int(sys.argv[5]) if len(sys.argv) > 5 else 0, ssl=ctx) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"LISTENING {port}", file=sys.stderr, flush=True)
        await server.serve_forever()


asyncio.run(main())
