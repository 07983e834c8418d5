"""Posts a JSON body read from a file through the Firma proxy with httpx, over HTTP/1.1 or
HTTP/2 (`--http2`), from `--count` threads at once (each its own connection), and prints one
JSON object per request: status, Firma reason, Retry-After, attempts, or the client's error.

With `--retry-503 N` a 503 is retried after its Retry-After, as the OpenAI and Anthropic SDKs
do, up to N times. Used by firma/tests/large_bodies.rs. Needs `httpx[http2]`.
Environment: HTTPS_PROXY (the sidecar), SSL_CERT_FILE (the Firma CA).
"""

import argparse
import json
import os
import sys
import threading
import time

import httpx


def chunks(body, size=1 << 20):
    view = memoryview(body)
    for i in range(0, len(body), size):
        yield bytes(view[i : i + size])


def one(url, body, http2, retries):
    attempts = 0
    while True:
        attempts += 1
        try:
            with httpx.Client(
                proxy=os.environ["HTTPS_PROXY"],
                verify=os.environ["SSL_CERT_FILE"],
                http1=not http2,
                http2=http2,
                timeout=120,
            ) as c:
                # Chunks, not one bytes object: httpcore's HTTP/2 sender slices the rest of
                # the body per 16 KiB frame, quadratic for tens of MB.
                r = c.post(
                    url,
                    content=chunks(body),
                    headers={
                        "content-type": "application/json",
                        "content-length": str(len(body)),
                    },
                )
        except Exception as e:  # the client's view of a reset is the point of the test
            return {"error": f"{type(e).__name__}: {e}", "attempts": attempts}
        try:
            reason = r.json().get("reason")
        except ValueError:
            reason = None
        if r.status_code == 503 and attempts <= retries:
            time.sleep(float(r.headers.get("retry-after", "1")))
            continue
        return {
            "status": r.status_code,
            "reason": reason,
            "retry_after": r.headers.get("retry-after"),
            "http_version": r.http_version,
            "attempts": attempts,
        }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--http2", action="store_true")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--retry-503", type=int, default=0)
    a = p.parse_args()
    with open(a.file, "rb") as f:
        body = f.read()
    results = [None] * a.count
    go = threading.Barrier(a.count)

    def run(i):
        go.wait()
        results[i] = one(a.url, body, a.http2, a.retry_503)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(a.count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
