"""Two keys through python-genai: each lists, reads and deletes only its own files and caches
(issue 13); another user's resource answers as one that does not exist."""

from __future__ import annotations

import pytest
from google.genai import errors, types

from conftest import Gateway
from test_genai import MODEL, client


def _cache(c, text: str):
    return c.caches.create(
        model=MODEL,
        config=types.CreateCachedContentConfig(
            contents=[types.Content(role="user", parts=[types.Part(text=text)])],
            ttl="3600s",
        ),
    )


def test_each_key_sees_only_its_own_files_and_caches(gateway: Gateway, tmp_path):
    _, key_a = gateway.new_user("free", prefix="alice")
    _, key_b = gateway.new_user("free", prefix="bob")
    a, b = client(gateway, key_a), client(gateway, key_b)
    pa, pb = tmp_path / "a.txt", tmp_path / "b.txt"
    pa.write_text("alice's notes")
    pb.write_text("bob's notes")
    fa = a.files.upload(file=pa, config=types.UploadFileConfig(mime_type="text/plain"))
    fb = b.files.upload(file=pb, config=types.UploadFileConfig(mime_type="text/plain"))
    ca = _cache(a, "alice's context")
    cb = _cache(b, "bob's context")

    assert [f.name for f in a.files.list()] == [fa.name]
    assert [f.name for f in b.files.list()] == [fb.name]
    assert [c.name for c in a.caches.list()] == [ca.name]
    assert [c.name for c in b.caches.list()] == [cb.name]

    # Bob cannot read or delete alice's; the answer is Gemini's "not found" for each kind.
    for call in (lambda: b.files.get(name=fa.name), lambda: b.files.delete(name=fa.name)):
        with pytest.raises(errors.ClientError) as e:
            call()
        assert e.value.code == 403 and e.value.status == "PERMISSION_DENIED", e.value
    with pytest.raises(errors.ClientError) as e:
        b.caches.get(name=ca.name)
    assert e.value.code == 403 and "CachedContent not found" in str(e.value)
    # Nor use them in a call.
    with pytest.raises(errors.ClientError) as e:
        b.models.generate_content(
            model=MODEL,
            contents=[types.Part.from_uri(file_uri=fa.uri, mime_type="text/plain"), "Summarise."],
        )
    assert e.value.code == 403, e.value

    # Alice's own still work, and deleting them empties her lists.
    assert a.files.get(name=fa.name).name == fa.name
    a.files.delete(name=fa.name)
    a.caches.delete(name=ca.name)
    assert list(a.files.list()) == []
    assert list(a.caches.list()) == []
    assert [f.name for f in b.files.list()] == [fb.name]
