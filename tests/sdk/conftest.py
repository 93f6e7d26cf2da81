"""SDK tests: the real python-genai and OpenAI clients (and curl) against the real binary.

One session fixture starts `gemini-meter mock-upstream` and `gemini-meter serve` on free ports
with a config written to a temp dir, and stops both with SIGTERM at the end (the gateway must
exit 0). Each test gets fresh users through the admin API, so usage never leaks between tests.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

ADMIN_TOKEN = "sdk-test-admin-token-7d1c"
UPSTREAM_KEY = "AIzaSDK-upstream-secret-0123456789"
ADMIN_ENV = "GM_SDK_ADMIN_TOKEN"
UPSTREAM_ENV = "GM_SDK_UPSTREAM_KEY"

# Prices of gemini-2.5-flash, as in config/gemini-meter.toml (USD per 1M tokens).
# Written into the config as these exact strings (str(Decimal) would give "1E-8").
PRICES = {"input": "0.30", "output": "2.50", "cached": "0.03", "per_byte": "0.00000001"}
FLASH_INPUT = Decimal(PRICES["input"])
FLASH_OUTPUT = Decimal(PRICES["output"])
FLASH_CACHED = Decimal(PRICES["cached"])
FILE_UPLOAD_PER_BYTE = Decimal(PRICES["per_byte"])

# Never send the local test traffic through a proxy from the environment.
for _var in ("NO_PROXY", "no_proxy"):
    _cur = os.environ.get(_var, "")
    os.environ[_var] = ",".join(x for x in (_cur, "127.0.0.1", "localhost") if x)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(gateway_port: int, mock_port: int, data_dir: Path) -> str:
    return f"""
[server]
listen = "127.0.0.1:{gateway_port}"
admin_token_env = "{ADMIN_ENV}"
drain_timeout_ms = 3000

[upstream]
base_url = "http://127.0.0.1:{mock_port}"
api_key_env = "{UPSTREAM_ENV}"
connect_timeout_ms = 2000

[storage]
path = "{data_dir}"
flush_interval_ms = 20

[pricing]
message_sent = "0"
ai_response_per_token = "0.0001"
file_upload_per_byte = "{PRICES['per_byte']}"

[pricing.models."gemini-2.5-flash"]
input_per_million = "{PRICES['input']}"
output_per_million = "{PRICES['output']}"
cached_input_per_million = "{PRICES['cached']}"
cache_storage_per_million_per_hour = "1.00"

[tiers.free]
messages = 1000

[tiers.tight]
messages = 2
"""


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Gateway:
    """The running gateway and mock, plus helpers for the admin and usage APIs."""

    def __init__(self, base: str, mock_base: str, logs: dict[str, Path]):
        self.base = base
        self.mock_base = mock_base
        self.logs = logs
        self.http = requests.Session()
        self.http.trust_env = False
        self._ids = itertools.count(1)

    # -- admin -----------------------------------------------------------------------------
    def admin(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        return self.http.request(method, self.base + path, headers=headers, timeout=10, **kw)

    def new_user(self, tier: str = "free", prefix: str = "sdk") -> tuple[str, str]:
        """Creates a user in `tier` with one key; returns (user_id, key)."""
        user_id = f"{prefix}-{tier}-{os.getpid()}-{next(self._ids)}"
        r = self.admin("POST", "/admin/users", json={"id": user_id, "tier": tier})
        assert r.status_code == 201, f"create user: {r.status_code} {r.text}"
        r = self.admin("POST", f"/admin/users/{user_id}/keys")
        assert r.status_code == 201, f"create key: {r.status_code} {r.text}"
        key = r.json()["key"]
        assert key.startswith("gm_"), key
        return user_id, key

    # -- usage API (the caller's own key) --------------------------------------------------
    def current(self, key: str) -> dict:
        r = self.http.get(self.base + "/api/usage/current", headers={"x-goog-api-key": key}, timeout=10)
        assert r.status_code == 200, f"/api/usage/current: {r.status_code} {r.text}"
        return r.json()

    def history(self, key: str, limit: int = 500) -> list[dict]:
        r = self.http.get(
            self.base + "/api/usage/history",
            params={"limit": limit},
            headers={"x-goog-api-key": key},
            timeout=10,
        )
        assert r.status_code == 200, f"/api/usage/history: {r.status_code} {r.text}"
        return r.json()["data"]

    def records(self, key: str, kind: str) -> list[dict]:
        return [r for r in self.history(key) if r["type"] == kind]

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Polls `probe` until it returns a truthy value (records land asynchronously)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = probe()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last probe: {last!r}")
            time.sleep(0.02)

    def wait_current(self, key: str, pred: Callable[[dict], bool], what: str, timeout: float = 5.0) -> dict:
        box: dict = {}

        def probe() -> bool:
            box["cur"] = self.current(key)["current_month"]
            return pred(box["cur"])

        try:
            self.wait_for(what, probe, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; current_month = {box.get('cur')}") from None
        return box["cur"]

    def wait_records(self, key: str, kind: str, n: int, timeout: float = 5.0) -> list[dict]:
        box: dict = {}

        def probe() -> bool:
            box["recs"] = self.records(key, kind)
            return len(box["recs"]) >= n

        try:
            self.wait_for(f"{n} {kind} record(s)", probe, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; history = {json.dumps(self.history(key), indent=1)}") from None
        return box["recs"]

    # -- mock upstream ---------------------------------------------------------------------
    def mock_stats(self) -> dict:
        return self.http.get(self.mock_base + "/mock/stats", timeout=10).json()

    def mock_reset(self) -> None:
        self.http.post(self.mock_base + "/mock/reset", timeout=10)


def _wait_healthy(url: str, procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited early with {p.returncode}:\n{_tail(logs[name])}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not healthy after {timeout}s:\n" + "\n".join(_tail(v) for v in logs.values()))


def _stop(p: subprocess.Popen, timeout: float = 15.0) -> int | None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    binary = os.environ.get("GEMINI_METER_BIN")
    if not binary:
        pytest.fail("GEMINI_METER_BIN must point at the gemini-meter binary (scripts/test sets it)")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"GEMINI_METER_BIN={binary} is not an executable")

    tmp = tmp_path_factory.mktemp("gm")
    mock_port, gw_port = _free_port(), _free_port()
    while gw_port == mock_port:
        gw_port = _free_port()
    cfg = tmp / "gm.toml"
    cfg.write_text(_config(gw_port, mock_port, tmp / "data"))

    env = {k: v for k, v in os.environ.items() if k not in (ADMIN_ENV, UPSTREAM_ENV)}
    env[ADMIN_ENV] = ADMIN_TOKEN
    env[UPSTREAM_ENV] = UPSTREAM_KEY
    env.setdefault("RUST_LOG", "info")

    logs = {"mock-upstream": tmp / "mock.log", "gateway": tmp / "gateway.log"}
    procs: dict[str, subprocess.Popen] = {}
    files = []
    try:
        f = open(logs["mock-upstream"], "wb")
        files.append(f)
        procs["mock-upstream"] = subprocess.Popen(
            [binary, "mock-upstream", "--listen", f"127.0.0.1:{mock_port}"],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )
        mock_base = f"http://127.0.0.1:{mock_port}"
        _wait_healthy(mock_base + "/mock/stats", procs, logs)

        f = open(logs["gateway"], "wb")
        files.append(f)
        procs["gateway"] = subprocess.Popen(
            [binary, "serve", "--config", str(cfg)],
            stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )
        base = f"http://127.0.0.1:{gw_port}"
        _wait_healthy(base + "/healthz", procs, logs)

        gw = Gateway(base, mock_base, logs)
        yield gw

        code = _stop(procs.pop("gateway"))
        assert code == 0, f"gateway exit status after SIGTERM: {code}\n{_tail(logs['gateway'])}"
    finally:
        for p in procs.values():
            _stop(p)
        for f in files:
            f.close()


@pytest.fixture
def free_user(gateway: Gateway) -> tuple[str, str]:
    return gateway.new_user("free")


def show(v: Any) -> str:
    """Full JSON for assertion messages (pytest abbreviates reprs of large dicts)."""
    return json.dumps(v, indent=1, sort_keys=True)


def flash_cost(prompt: int, output: int, thoughts: int = 0, cached: int = 0) -> Decimal:
    """The interface's cost formula for gemini-2.5-flash."""
    return (
        (prompt - cached) * FLASH_INPUT + cached * FLASH_CACHED + (output + thoughts) * FLASH_OUTPUT
    ) / Decimal(1_000_000)
