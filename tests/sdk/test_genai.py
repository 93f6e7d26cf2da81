"""python-genai (`from google import genai`) through the gateway: generate, stream, upload,
countTokens, model listing and the gateway's own errors, checked against the usage API."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest
from google import genai
from google.genai import errors, types

from conftest import FILE_UPLOAD_PER_BYTE, Gateway, flash_cost, show

MODEL = "gemini-2.5-flash"


def client(gateway: Gateway, key: str) -> genai.Client:
    return genai.Client(
        api_key=key,
        vertexai=False,
        http_options=types.HttpOptions(base_url=gateway.base),
    )


def check_ai_response(rec: dict, um: types.GenerateContentResponseUsageMetadata, stream: bool) -> None:
    """An ai_response record agrees with the SDK's usage_metadata."""
    md = rec["metadata"]
    prompt = um.prompt_token_count or 0
    output = um.candidates_token_count or 0
    thoughts = um.thoughts_token_count or 0
    cached = um.cached_content_token_count or 0
    assert rec["tokens"] == um.total_token_count, show(rec)
    assert rec["messages"] == 0, show(rec)
    assert md["model"] == MODEL, show(rec)
    assert md["prompt_tokens"] == prompt, show(rec)
    assert md["output_tokens"] == output, show(rec)
    assert md["thoughts_tokens"] == thoughts, show(rec)
    assert md["cached_tokens"] == cached, show(rec)
    assert md["stream"] is stream, show(rec)
    assert md["status"] == "ok", show(rec)
    assert md["token_source"] == "upstream", show(rec)
    assert md["upstream_status"] == 200, show(rec)
    assert Decimal(rec["cost"]) == flash_cost(prompt, output, thoughts, cached), show(rec)


# ---------------------------------------------------------------------------------------------
# 1. generate_content and generate_content_stream


def unary(c: genai.Client, prompt: str) -> types.GenerateContentResponseUsageMetadata:
    resp = c.models.generate_content(model=MODEL, contents=prompt)
    assert resp.text and resp.text.strip(), resp
    um = resp.usage_metadata
    assert um is not None and um.total_token_count and um.total_token_count > 0, um
    return um


def streamed(c: genai.Client, prompt: str) -> types.GenerateContentResponseUsageMetadata:
    chunks = list(c.models.generate_content_stream(model=MODEL, contents=prompt))
    assert len(chunks) >= 2, f"expected a streamed answer in several chunks, got {len(chunks)}"
    assert "".join(ch.text or "" for ch in chunks).strip(), chunks
    with_usage = [ch.usage_metadata for ch in chunks if ch.usage_metadata and ch.usage_metadata.total_token_count]
    assert with_usage, "no chunk carried usage_metadata"
    return with_usage[-1]  # cumulative: the last report is the answer's usage


def test_generate_content_is_metered_with_the_sdks_token_counts(gateway: Gateway):
    _, key = gateway.new_user("free")
    c = client(gateway, key)
    um = unary(c, "Say hello to the metering gateway.")

    recs = gateway.wait_records(key, "ai_response", 1)
    assert len(recs) == 1, show(recs)
    check_ai_response(recs[0], um, stream=False)
    cur = gateway.current(key)["current_month"]
    assert cur["messages"] == 1, cur
    assert cur["tokens"] == um.total_token_count, cur
    assert Decimal(cur["cost"]) == Decimal(recs[0]["cost"]), cur
    sent = gateway.records(key, "message_sent")
    assert len(sent) == 1 and sent[0]["messages"] == 1 and sent[0]["tokens"] == 0, show(sent)


def test_generate_content_stream_is_metered_with_the_sdks_token_counts(gateway: Gateway):
    _, key = gateway.new_user("free")
    c = client(gateway, key)
    um = streamed(c, "Stream a short answer, please.")

    recs = gateway.wait_records(key, "ai_response", 1)
    assert len(recs) == 1, show(recs)
    check_ai_response(recs[0], um, stream=True)
    cur = gateway.current(key)["current_month"]
    assert cur["messages"] == 1, cur
    assert cur["tokens"] == um.total_token_count, cur
    assert Decimal(cur["cost"]) == Decimal(recs[0]["cost"]), cur


def test_usage_current_adds_up_the_sdks_token_counts(gateway: Gateway):
    _, key = gateway.new_user("free")
    c = client(gateway, key)
    expected = 0
    for i, call in enumerate([unary, streamed, unary, streamed]):
        expected += call(c, f"request number {i} " + "x" * (10 * i)).total_token_count
        gateway.wait_records(key, "ai_response", i + 1)
        cur = gateway.current(key)["current_month"]
        assert cur["messages"] == i + 1, cur
        assert cur["tokens"] == expected, (i, cur)
    recs = gateway.records(key, "ai_response")
    assert sum(r["tokens"] for r in recs) == expected, show(recs)
    assert Decimal(gateway.current(key)["current_month"]["cost"]) == sum(Decimal(r["cost"]) for r in recs)


def test_quota_headers_reach_the_sdk(gateway: Gateway):
    _, key = gateway.new_user("free")
    c = client(gateway, key)  # keep a reference: a collected Client closes its HTTP client
    resp = c.models.generate_content(model=MODEL, contents="hi")
    headers = {k.lower(): v for k, v in (resp.sdk_http_response.headers or {}).items()}
    assert headers.get("x-quota-messages-limit") == "1000", headers
    assert "x-quota-messages-remaining" in headers, headers
    assert not any(k.startswith("x-quota-tokens") for k in headers), "tokens are unlimited in this tier"


# ---------------------------------------------------------------------------------------------
# 2. files.upload: the SDK points the chunks at its base URL and sends them without a key


@pytest.mark.parametrize(
    "size",
    [300 * 1024, 8 * 1024 * 1024 + 4321],
    ids=["300KB-one-chunk", "8MiB+-two-chunks"],
)
def test_files_upload_is_metered_in_bytes(gateway: Gateway, tmp_path, size: int):
    _, key = gateway.new_user("free")
    path = tmp_path / "upload.bin"
    path.write_bytes(os.urandom(size))

    c = client(gateway, key)  # keep a reference: a collected Client closes its HTTP client
    f = c.files.upload(
        file=path, config=types.UploadFileConfig(mime_type="application/octet-stream", display_name="sdk-upload")
    )
    assert f.name and f.name.startswith("files/"), f
    assert f.size_bytes == size, f

    def uploaded() -> int:
        return sum(r["bytes"] for r in gateway.records(key, "file_upload"))

    gateway.wait_for(f"file_upload bytes == {size}", lambda: uploaded() >= size)
    recs = gateway.records(key, "file_upload")
    assert sum(r["bytes"] for r in recs) == size, show(recs)
    assert all(r["messages"] == 0 and r["tokens"] == 0 for r in recs), show(recs)
    assert sum(Decimal(r["cost"]) for r in recs) == size * FILE_UPLOAD_PER_BYTE, show(recs)
    cur = gateway.current(key)["current_month"]
    assert cur["bytes"] == size, cur
    assert cur["messages"] == 0 and cur["tokens"] == 0, cur
    assert gateway.records(key, "ai_response") == [] and gateway.records(key, "message_sent") == []


# ---------------------------------------------------------------------------------------------
# 3. countTokens and the model list are passed through and not metered


def test_count_tokens_and_list_models_are_not_metered(gateway: Gateway):
    _, key = gateway.new_user("free")
    c = client(gateway, key)

    ct = c.models.count_tokens(model=MODEL, contents="How many tokens is this?")
    assert ct.total_tokens and ct.total_tokens > 0, ct
    names = [m.name for m in c.models.list()]
    assert f"models/{MODEL}" in names, names
    m = c.models.get(model=MODEL)
    assert m.name == f"models/{MODEL}", m

    # A metered call afterwards: once its records are visible, anything the calls above
    # had recorded would be visible too (the recorder keeps order).
    c.models.generate_content(model=MODEL, contents="sentinel")
    gateway.wait_records(key, "ai_response", 1)
    kinds = sorted(r["type"] for r in gateway.history(key))
    assert kinds == ["ai_response", "message_sent"], kinds
    cur = gateway.current(key)["current_month"]
    assert cur["messages"] == 1 and cur["bytes"] == 0, cur


# ---------------------------------------------------------------------------------------------
# 5. The gateway's errors surface as the SDK's errors


def test_message_quota_raises_client_error_403(gateway: Gateway):
    _, key = gateway.new_user("tight")
    c = client(gateway, key)
    before = gateway.mock_stats()["generate_requests"]

    for i in range(2):
        assert c.models.generate_content(model=MODEL, contents=f"message {i}").text

    with pytest.raises(errors.ClientError) as ei:
        c.models.generate_content(model=MODEL, contents="one too many")
    e = ei.value
    assert e.code == 403, (e.code, e.message)
    assert e.status == "PERMISSION_DENIED", e.status
    assert "You have reached your monthly message limit" in (e.message or ""), e.message

    # The stream call is refused the same way (the SDK raises when iterating).
    with pytest.raises(errors.ClientError) as ei:
        list(c.models.generate_content_stream(model=MODEL, contents="still too many"))
    assert ei.value.code == 403, (ei.value.code, ei.value.message)
    assert "You have reached your monthly message limit" in (ei.value.message or "")

    # Refused before anything went upstream; only the two admitted messages count.
    assert gateway.mock_stats()["generate_requests"] - before == 2
    gateway.wait_records(key, "ai_response", 2)
    cur = gateway.current(key)["current_month"]
    assert cur["messages"] == 2, cur


def test_wrong_key_raises_client_error_401(gateway: Gateway):
    c = client(gateway, "gm_" + "Zz9" * 12)
    with pytest.raises(errors.ClientError) as ei:
        c.models.generate_content(model=MODEL, contents="hello?")
    assert ei.value.code == 401, (ei.value.code, ei.value.message)
    assert ei.value.status == "UNAUTHENTICATED", ei.value.status
    assert (ei.value.message or "").startswith("API key not valid"), ei.value.message

    with pytest.raises(errors.ClientError) as ei:
        c.models.count_tokens(model=MODEL, contents="hello?")
    assert ei.value.code == 401


def test_revoked_key_is_refused_at_once(gateway: Gateway):
    user_id, key = gateway.new_user("free")
    c = client(gateway, key)
    assert c.models.generate_content(model=MODEL, contents="before revoke").text
    keys = gateway.admin("GET", f"/admin/users/{user_id}/keys").json()
    key_ids = [k["key_id"] for k in (keys["data"] if isinstance(keys, dict) and "data" in keys else keys)]
    assert len(key_ids) == 1, keys
    r = gateway.admin("DELETE", f"/admin/keys/{key_ids[0]}")
    assert r.status_code in (200, 204), (r.status_code, r.text)
    with pytest.raises(errors.ClientError) as ei:
        c.models.generate_content(model=MODEL, contents="after revoke")
    assert ei.value.code == 401, (ei.value.code, ei.value.message)


# ---------------------------------------------------------------------------------------------
# No gateway key reaches the upstream, whatever the SDK does


def test_no_gateway_key_reaches_upstream(gateway: Gateway, tmp_path):
    _, key = gateway.new_user("free")
    c = client(gateway, key)
    gateway.mock_reset()
    c.models.generate_content(model=MODEL, contents="a")
    list(c.models.generate_content_stream(model=MODEL, contents="b"))
    c.models.count_tokens(model=MODEL, contents="c")
    path = tmp_path / "f.txt"
    path.write_bytes(b"x" * 1000)
    c.files.upload(file=path, config=types.UploadFileConfig(mime_type="text/plain"))
    stats = gateway.mock_stats()
    assert stats["leaked_gateway_keys"] == 0, stats
    assert stats["upload_bytes"] == 1000, stats
    assert stats["generate_requests"] == 2, stats
