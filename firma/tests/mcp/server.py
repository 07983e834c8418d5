"""A real MCP server (the `mcp` Python SDK) over TLS for firma/tests/mcp_enforcement.rs.

Usage: server.py CERT KEY CALLS_LOG
Serves the streamable HTTP transport at /mcp on 127.0.0.1 (a free port, printed as
`listening PORT`). Tools: read_file(path), delete_repo(name); every execution is appended to
CALLS_LOG as a JSON line, which is what the test counts as "the server received it".
"""
import asyncio
import json
import socket
import sys

import uvicorn
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
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    # The server is reached as mcp.test (its certificate's name): allow that Host.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=["mcp.test", "mcp.test:*"]
    )
    app = mcp.streamable_http_app(transport_security=security)
    config = uvicorn.Config(
        app, ssl_certfile=cert, ssl_keyfile=key, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    print(f"listening {sock.getsockname()[1]}", file=sys.stderr, flush=True)
    await server.serve(sockets=[sock])


asyncio.run(main())
