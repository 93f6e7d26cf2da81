"""The OpenAI Python SDK against Gemini's OpenAI-compatible endpoint, through the gateway."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from conftest import Gateway, show

MODEL = "gemini-2.5-flash"


def client(gateway: Gateway, key: str) -> OpenAI:
    return OpenAI(api_key=key, base_url=gateway.base + "/v1beta/openai/", max_retries=0, timeout=30)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello through the gateway."},
]


def check_record(rec: dict, usage, stream: bool) -> None:
    assert rec["tokens"] == usage.total_tokens, show(rec)
    assert rec["messages"] == 0, show(rec)
    md = rec["metadata"]
    assert md["model"] == MODEL, show(rec)
    assert md["prompt_tokens"] == usage.prompt_tokens, show(rec)
    assert md["output_tokens"] + md["thoughts_tokens"] == usage.completion_tokens, show(rec)
    assert md["stream"] is stream, show(rec)
    assert md["status"] == "ok", show(rec)
    assert md["token_source"] == "upstream", show(rec)


def chat(c: OpenAI):
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert r.choices and r.choices[0].message.content, r
    assert r.usage is not None and r.usage.total_tokens > 0, r.usage
    return r.usage


def chat_stream(c: OpenAI):
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert len(chunks) >= 2, chunks
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip(), chunks
    usages = [ch.usage for ch in chunks if ch.usage is not None]
    assert usages, "no chunk carried usage"
    return usages[-1]  # Gemini's compat layer puts it on the last (finish) chunk


def test_chat_completions_is_metered(gateway: Gateway):
    _, key = gateway.new_user("free")
    u = chat(client(gateway, key))
    recs = gateway.wait_records(key, "ai_response", 1)
    check_record(recs[0], u, stream=False)
    cur = gateway.current(key)["current_month"]
    assert cur["messages"] == 1 and cur["tokens"] == u.total_tokens, cur


def test_chat_completions_stream_is_metered(gateway: Gateway):
    _, key = gateway.new_user("free")
    u = chat_stream(client(gateway, key))
    recs = gateway.wait_records(key, "ai_response", 1)
    check_record(recs[0], u, stream=True)
    cur = gateway.current(key)["current_month"]
    assert cur["messages"] == 1 and cur["tokens"] == u.total_tokens, cur


def test_chat_completions_usage_adds_up(gateway: Gateway):
    _, key = gateway.new_user("free")
    c = client(gateway, key)
    u1 = chat(c)
    u2 = chat_stream(c)
    gateway.wait_records(key, "ai_response", 2)
    cur = gateway.current(key)["current_month"]
    assert cur["messages"] == 2, cur
    assert cur["tokens"] == u1.total_tokens + u2.total_tokens, cur


def test_wrong_key_raises_authentication_error(gateway: Gateway):
    c = client(gateway, "gm_" + "Qq7" * 12)
    with pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert ei.value.status_code == 401
    assert "API key not valid" in str(ei.value), str(ei.value)

    with pytest.raises(openai.AuthenticationError):
        list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))


def test_message_quota_raises_permission_denied(gateway: Gateway):
    _, key = gateway.new_user("tight")
    c = client(gateway, key)
    for _ in range(2):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert ei.value.status_code == 403
    assert "You have reached your monthly message limit" in str(ei.value), str(ei.value)
