"""A real HTTP server (TLS, HTTP/1.1) playing an MCP endpoint's GET event stream, for
firma/tests/mcp_enforcement.rs: the server-initiated messages the `mcp` SDK server cannot be
made to send (bytes no strict parser reads as one JSON-RPC message).

Usage: server_stream.py CERT KEY CALLS_LOG
Listens on 127.0.0.1 (a free port), printed as `listening PORT`. A GET answers
`text/event-stream` with the events below, then closes; anything else is a 404. Each request
line is appended to CALLS_LOG as a JSON line ({"method", "path"}).
"""
import asyncio
import json
import ssl
import sys

cert, key, calls = sys.argv[1], sys.argv[2], sys.argv[3]

EVENTS = [
    # A server request no strict parser can read: duplicate `method` keys (Python's json
    # keeps the last: a client would sample, the sidecar cannot say what it is).
    b'event: message\ndata: {"jsonrpc":"2.0","id":"s1","method":"roots/list",'
    b'"method":"sampling/createMessage","params":{}}\n\n',
    # A method outside the character set.
    b'data: {"jsonrpc":"2.0","id":"s2","method":"roots list"}\n\n',
    # Not JSON at all.
    b"data: {not json\n\n",
    # A well-formed server request, its lines ending in a bare CR (the SSE specification).
    b'event: message\rdata: {"jsonrpc":"2.0","id":"s3","method":"roots/list"}\r\r',
    # A well-formed notification.
    b'data: {"jsonrpc":"2.0","method":"notifications/message",'
    b'"params":{"level":"info","data":"stream done"}}\r\n\r\n',
]


async def handle(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    method, path = head.split(b"\r\n", 1)[0].decode().split(" ")[:2]
    with open(calls, "a") as f:
        f.write(json.dumps({"method": method, "path": path}) + "\n")
    if method != "GET":
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    else:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n\r\n"
        )
        for event in EVENTS:
            writer.write(event)
            await writer.drain()
    await writer.drain()
    writer.close()


async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
