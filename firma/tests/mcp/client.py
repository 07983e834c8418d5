"""A real MCP client (the `mcp` Python SDK) for firma/tests/mcp_enforcement.rs.

Usage: [FIRMA_CAPABILITY=TOKEN] client.py URL PROXY CA STEPS_JSON
Opens one session to URL through the HTTP proxy PROXY ("-": none, for `firma run`), trusting CA
for TLS, with the streamable HTTP transport, or the legacy HTTP+SSE one when URL ends in /sse;
then runs each
step of STEPS_JSON (a list of [tool, {arguments}]) in order on that same session, printing one
JSON line per step: {"tool", "ok", "text"} or {"tool", "error", "code"}. Also prints
{"tools": [...]} with the names tools/list returned.
"""
import asyncio
import json
import os
import ssl
import sys

import httpx2 as httpx
from mcp import ClientSession

try:  # mcp >= 2
    from mcp.client.streamable_http import streamable_http_client

    def connect(url, client):
        return streamable_http_client(url, http_client=client)
except ImportError:  # mcp 1.x
    from mcp.client.streamable_http import streamablehttp_client

    def connect(url, client):
        return streamablehttp_client(url)

from mcp.client.sse import sse_client

url, proxy, ca, steps = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
proxy = None if proxy == "-" else proxy


def legacy(url, ctx, headers):
    def factory(headers=None, timeout=None, auth=None):
        return httpx.AsyncClient(
            proxy=proxy, verify=ctx, timeout=timeout or 20, trust_env=False, headers=headers, auth=auth
        )

    return sse_client(url, headers=headers, httpx_client_factory=factory)


async def main():
    ctx = ssl.create_default_context(cafile=ca)
    headers = {}
    if "FIRMA_CAPABILITY" in os.environ:
        headers["x-firma-capability"] = os.environ["FIRMA_CAPABILITY"]
    async with httpx.AsyncClient(
        proxy=proxy, verify=ctx, timeout=20, trust_env=False, headers=headers
    ) as client:
        transport = legacy(url, ctx, headers) if url.endswith("/sse") else connect(url, client)
        async with transport as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = await session.list_tools()
                print(json.dumps({"tools": sorted(t.name for t in tools.tools)}), flush=True)
                for tool, args in steps:
                    try:
                        r = await session.call_tool(tool, args)
                        text = "".join(getattr(c, "text", "") for c in r.content)
                        print(json.dumps({"tool": tool, "ok": not r.is_error, "text": text}), flush=True)
                    except Exception as e:  # the SDK raises the JSON-RPC error of the call
                        err = getattr(e, "error", None)
                        print(json.dumps({
                            "tool": tool,
                            "error": str(e),
                            "code": getattr(err, "code", None),
                        }), flush=True)


asyncio.run(main())
