"""A real MCP server (the `mcp` Python SDK) over TLS for firma/tests/mcp_enforcement.rs.

Usage: server.py CERT KEY CALLS_LOG [ADDR:PORT]
Serves the streamable HTTP transport at /mcp and the legacy HTTP+SSE transport (GET /sse,
POST /messages/?session_id=) on 127.0.0.1 (a free port) or ADDR:PORT, printed as
`listening PORT`. Tools: read_file(path), delete_repo(name); every execution is appended to
CALLS_LOG as a JSON line, which is what the test counts as "the server received it".
"""
import asyncio
import json
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from mcp.server.transport_security import TransportSecuritySettings

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server

cert, key, calls = sys.argv[1], sys.argv[2], sys.argv[3]
mcp = Server("firma-test")


def record(tool, **args):
    with open(calls, "a") as f:
        f.write(json.dumps({"tool": tool, "args": args}) + "\n")


@mcp.tool()
def read_file(path: str) -> str:
    """Reads a file (pretends to)."""
    record("read_file", path=path)
    return f"contents of {path}"


@mcp.tool()
def delete_repo(name: str) -> str:
    """Deletes a repository (pretends to)."""
    record("delete_repo", name=name)
    return f"deleted {name}"


async def main():
    addr, port = ("127.0.0.1", 0)
    if len(sys.argv) > 4:
        a, p = sys.argv[4].rsplit(":", 1)
        addr, port = a, int(p)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(64)
    # The server is reached as mcp.test (its certificate's name): allow that Host.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=["mcp.test", "mcp.test:*"]
    )
    streamable = mcp.streamable_http_app(transport_security=security)
    legacy = mcp.sse_app(transport_security=security)
    app = Starlette(
        routes=list(streamable.routes) + list(legacy.routes),
        lifespan=streamable.router.lifespan_context,
    )
    config = uvicorn.Config(
        app, ssl_certfile=cert, ssl_keyfile=key, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    print(f"listening {sock.getsockname()[1]}", file=sys.stderr, flush=True)
    await server.serve(sockets=[sock])


asyncio.run(main())
