"""python-genai over TLS: the gateway serves HTTPS with a certificate of a test CA made here
with the openssl command line, and the SDK trusts that CA (an `ssl.SSLContext` passed to its
httpx client). Generation, streaming and the usage API, with the gateway's own records."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests
from google import genai
from google.genai import types

from conftest import (
    ADMIN_ENV,
    ADMIN_TOKEN,
    UPSTREAM_ENV,
    UPSTREAM_KEY,
    _config,
    _free_port,
    _stop,
    _tail,
)

MODEL = "gemini-2.5-flash"


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost and 127.0.0.1 signed by it."""
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=gm-sdk-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    _openssl(d, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(d, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", "0x1234abcd", "-days", "30", "-out", "server.pem", "-extfile", "server.ext")
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory):
    binary = os.environ.get("GEMINI_METER_BIN")
    if not binary:
        pytest.fail("GEMINI_METER_BIN must point at the gemini-meter binary (scripts/test sets it)")
    tmp = tmp_path_factory.mktemp("gm-tls")
    ca, cert, key = make_certs(tmp)
    mock_port, gw_port = _free_port(), _free_port()
    cfg = tmp / "gm.toml"
    text = _config(gw_port, mock_port, tmp / "data")
    text = text.replace(
        "drain_timeout_ms = 3000\n",
        f'drain_timeout_ms = 3000\n\n[server.tls]\ncert_path = "{cert}"\nkey_path = "{key}"\n',
        1,
    )
    cfg.write_text(text)
    env = dict(os.environ, **{ADMIN_ENV: ADMIN_TOKEN, UPSTREAM_ENV: UPSTREAM_KEY})
    logs = {"mock": tmp / "mock.log", "gateway": tmp / "gateway.log"}
    procs: dict[str, subprocess.Popen] = {}
    with open(logs["mock"], "wb") as mf, open(logs["gateway"], "wb") as gf:
        procs["mock"] = subprocess.Popen(
            [binary, "mock-upstream", "--listen", f"127.0.0.1:{mock_port}"], stdout=mf, stderr=subprocess.STDOUT, env=env
        )
        procs["gateway"] = subprocess.Popen(
            [binary, "serve", "--config", str(cfg)], stdout=gf, stderr=subprocess.STDOUT, env=env, cwd=tmp
        )
        base = f"https://localhost:{gw_port}"
        http = requests.Session()
        http.trust_env = False
        http.verify = str(ca)
        deadline = time.monotonic() + 30
        while True:
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited: {_tail(logs[name])}"
            try:
                if http.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, _tail(logs["gateway"])
            time.sleep(0.05)
        try:
            yield base, ca, http
            assert _stop(procs.pop("gateway")) == 0, _tail(logs["gateway"])
        finally:
            for p in procs.values():
                _stop(p)


def test_genai_generates_and_streams_over_tls_with_the_test_ca(tls_gateway) -> None:
    base, ca, http = tls_gateway
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = http.post(base + "/admin/users", json={"id": "tls-sdk", "tier": "free"}, headers=auth, timeout=10)
    assert r.status_code == 201, r.text
    r = http.post(base + "/admin/users/tls-sdk/keys", headers=auth, timeout=10)
    assert r.status_code == 201, r.text
    key = r.json()["key"]

    ctx = ssl.create_default_context(cafile=str(ca))
    client = genai.Client(
        api_key=key,
        vertexai=False,
        http_options=types.HttpOptions(base_url=base, client_args={"verify": ctx}),
    )
    resp = client.models.generate_content(model=MODEL, contents="Hello over TLS")
    assert resp.text and resp.usage_metadata and resp.usage_metadata.total_token_count
    chunks = list(client.models.generate_content_stream(model=MODEL, contents="Stream over TLS"))
    assert len(chunks) > 1
    streamed = chunks[-1].usage_metadata
    assert streamed and streamed.total_token_count

    want = resp.usage_metadata.total_token_count + streamed.total_token_count
    deadline = time.monotonic() + 5
    while True:
        cur = http.get(base + "/api/usage/current", headers={"x-goog-api-key": key}, timeout=10).json()
        if cur["current_month"]["messages"] == 2 and cur["current_month"]["tokens"] == want:
            break
        assert time.monotonic() < deadline, cur
        time.sleep(0.02)

    # A client that does not trust the test CA is refused at the handshake.
    plain = genai.Client(api_key=key, vertexai=False, http_options=types.HttpOptions(base_url=base))
    with pytest.raises(Exception) as e:
        plain.models.generate_content(model=MODEL, contents="untrusted")
    assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value) or "certificate" in repr(e.value).lower()
