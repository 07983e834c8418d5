"""Sends one MCP POST over HTTP/2 with its body split into DATA frames (hostile test of
firma/tests/mcp_enforcement.rs).

Usage: FIRMA_CAPABILITY=TOKEN h2_split.py URL PROXY CA PIECES_JSON
PIECES_JSON is a list of strings sent as separate chunks (one DATA frame each, with a flush
and a pause-free yield between them). Prints one JSON line: {"http_version", "status", "body"}.
"""
import asyncio
import json
import os
import ssl
import sys

import httpx

url, proxy, ca, pieces = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])


async def body():
    for p in pieces:
        yield p.encode()
        await asyncio.sleep(0)


async def main():
    ctx = ssl.create_default_context(cafile=ca)
    async with httpx.AsyncClient(
        proxy=proxy, verify=ctx, http2=True, http1=False, timeout=20, trust_env=False
    ) as client:
        r = await client.post(
            url,
            content=body(),
            headers={
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                "x-firma-capability": os.environ["FIRMA_CAPABILITY"],
            },
        )
        print(json.dumps({"http_version": r.http_version, "status": r.status_code, "body": r.text}))


asyncio.run(main())
