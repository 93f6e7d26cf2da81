"""A resumable upload done with curl the way Gemini's REST samples do it: the client follows the
`x-goog-upload-url` the gateway hands back, and sends the bytes there without a key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import requests

from conftest import Gateway


def curl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("curl")
    assert exe, "curl is needed for this test"
    return subprocess.run([exe, "-sS", "--noproxy", "*", *args], capture_output=True, text=True, timeout=60)


def headers_of(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return out


def test_curl_resumable_upload_follows_the_rewritten_url(gateway: Gateway, tmp_path: Path):
    _, key = gateway.new_user("free")
    size = 200_000
    data = tmp_path / "image.jpg"
    data.write_bytes(os.urandom(size))

    h1 = tmp_path / "start.headers"
    p = curl(
        "-X", "POST", f"{gateway.base}/upload/v1beta/files",
        "-D", str(h1), "-o", str(tmp_path / "start.body"), "-w", "%{http_code}",
        "-H", f"x-goog-api-key: {key}",
        "-H", "X-Goog-Upload-Protocol: resumable",
        "-H", "X-Goog-Upload-Command: start",
        "-H", f"X-Goog-Upload-Header-Content-Length: {size}",
        "-H", "X-Goog-Upload-Header-Content-Type: image/jpeg",
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"file": {"display_name": "curl-upload"}}),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "200", (p.stdout, (tmp_path / "start.body").read_text(errors="replace"))
    hs = headers_of(h1)
    upload_url = hs.get("x-goog-upload-url")
    assert upload_url, hs
    assert upload_url.startswith(gateway.base + "/upload/"), f"upload URL must point at the gateway: {upload_url}"
    assert "upload_id=" in upload_url, upload_url

    h2 = tmp_path / "upload.headers"
    body = tmp_path / "file_info.json"
    p = curl(
        upload_url,
        "-D", str(h2), "-o", str(body), "-w", "%{http_code}",
        "-H", f"Content-Length: {size}",
        "-H", "X-Goog-Upload-Offset: 0",
        "-H", "X-Goog-Upload-Command: upload, finalize",
        "--data-binary", f"@{data}",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "200", (p.stdout, body.read_text(errors="replace"))
    assert headers_of(h2).get("x-goog-upload-status") == "final", headers_of(h2)
    info = json.loads(body.read_text())
    assert info["file"]["name"].startswith("files/"), info
    assert int(info["file"]["sizeBytes"]) == size, info

    def uploaded() -> int:
        return sum(r["bytes"] for r in gateway.records(key, "file_upload"))

    gateway.wait_for(f"file_upload bytes == {size}", lambda: uploaded() >= size)
    assert uploaded() == size
    cur = gateway.current(key)["current_month"]
    assert cur["bytes"] == size and cur["messages"] == 0, cur


def test_keyless_chunk_for_an_unknown_session_is_refused(gateway: Gateway):
    before = gateway.mock_stats()["requests"]
    r = requests.post(
        f"{gateway.base}/upload/v1beta/files?upload_id=not-a-session&upload_protocol=resumable",
        headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"},
        data=b"x" * 100,
        timeout=10,
    )
    assert r.status_code == 401, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == 401 and err["status"] == "UNAUTHENTICATED", err
    assert err["message"].startswith("Missing API key"), err
    assert gateway.mock_stats()["requests"] == before, "the refused chunk must not reach the upstream"
