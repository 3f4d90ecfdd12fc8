"""Credentials in corpus URLs (``pipelines.store.secrets.redact_url``, the one rule every
stored or shown URL goes through): for any URL, the redacted form holds no secret — not
from userinfo, not from a signature/token parameter, not from a URL cut short in an
excerpt — and keeps everything else; a URL without one is returned unchanged (it is an
identity). The URL source stores and identifies URLs by that form, or refuses them."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipelines.ingest.fetch import FetchSettings
from pipelines.ingest.sources.urls import UrlSource, url_doc_id
from pipelines.ingest.validation import excerpt
from pipelines.store.secrets import redact_text, redact_url, url_has_credentials

SECRET_NAMES = ["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "token", "sig", "signature",
                "Signature", "access_token", "api_key", "apiKey", "key", "password", "auth", "SIG", "TOKEN",
                "x-goog-signature", "sas_token", "%73ig", "refresh_token", "client_secret"]
PLAIN_NAMES = ["page", "w", "h", "format", "lang", "size", "v", "se", "sv", "sp", "x-amz-algorithm",
               "x-amz-date", "x-amz-expires", "response-content-type"]

lower = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
secrets_ = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=6, max_size=24).map(lambda s: "Q" + s)


@st.composite
def urls(draw):
    """(url, secret, kept parts): a URL whose credentials all hold ``secret``."""
    secret = draw(secrets_)
    scheme = draw(st.sampled_from(["http", "https", "s3"]))
    host = ".".join(draw(st.lists(lower, min_size=1, max_size=3))) + draw(st.sampled_from(["", ":8080", ":443"]))
    path = "/" + "/".join(draw(st.lists(lower, max_size=3)))
    userinfo = draw(st.sampled_from(["", f"{secret}@", f"user:{secret}@", f"{secret}:{secret}@"]))
    plain = [(n, draw(lower)) for n in draw(st.lists(st.sampled_from(PLAIN_NAMES), max_size=3, unique=True))]
    hidden = [(n, secret + draw(st.sampled_from(["", "%2F1", "%3D%3D", "/x=="]))) for n in
              draw(st.lists(st.sampled_from(SECRET_NAMES), max_size=3, unique=True))]
    pairs = draw(st.permutations(plain + hidden))
    sep = draw(st.sampled_from(["&", ";"]))
    query = sep.join(f"{n}={v}" for n, v in pairs)
    in_fragment = draw(st.booleans()) and bool(query)
    url = f"{scheme}://{userinfo}{host}{path}" + (f"#{query}" if in_fragment else (f"?{query}" if query else ""))
    has_secret = bool(userinfo) or bool(hidden)
    return url, secret, {"host": host, "path": path, "plain": [f"{n}={v}" for n, v in plain]}, has_secret


@settings(max_examples=500, deadline=None)
@given(urls())
def test_the_redacted_url_never_holds_the_secret_and_keeps_the_rest(case):
    url, secret, kept, has_secret = case
    out = redact_url(url)
    assert secret not in out
    assert kept["host"] in out and kept["path"] in out
    for pair in kept["plain"]:
        assert pair in out
    assert url_has_credentials(url) == has_secret
    if not has_secret:
        assert out == url  # an identity: a URL without credentials is kept byte for byte
    assert redact_url(out) == out  # idempotent: the stored form is its own identity


@settings(max_examples=300, deadline=None)
@given(urls(), st.text(" ,;()[]'\"", max_size=3), st.text(" ,;()[]'\"", max_size=3))
def test_a_url_inside_text_is_redacted(case, before, after):
    url, secret, _, _ = case
    line = f"GET{before or ' '}{url}{after or ' '}failed"
    assert secret not in redact_text(line)
    assert redact_text(redact_text(line)) == redact_text(line)  # a detail redacted twice stays the same
    detail = f"GET {redact_url(url)}: HTTP 404"
    assert redact_text(detail) == detail  # the fetcher's detail survives the quarantine's redaction
    assert secret not in redact_text(json.dumps({"url": url, "caption": "x"}))


@settings(max_examples=300, deadline=None)
@given(urls(), st.data())
def test_a_url_cut_short_holds_no_part_of_the_secret(case, data):
    """An excerpt is cut at a length: the cut can fall inside the userinfo or a value."""
    url, secret, _, _ = case
    assume(f"://{secret}" not in url)  # user:secret@; a bare token@ cut before its @ reads as a host
    cut = data.draw(st.integers(0, len(url)))
    out = redact_text(url[:cut])
    assert secret[:4] not in out


@pytest.mark.parametrize("url", ["http://[::1", "http://user:QSECRETXYZ@[bad/x?sig=QSECRETXYZ",
                                 "https://u:QSECRETXYZ@h/x?token=QSECRETXYZ&a=1#sig=QSECRETXYZ"])
def test_urls_that_do_not_parse_are_redacted_too(url):
    assert "QSECRETXYZ" not in redact_url(url)


def test_the_quarantine_excerpt_is_redacted():
    raw = {"raw_excerpt": '{"url": "https://u:QSECRETXYZ@h.example/a.png?X-Amz-Signature=QSECRETXYZ"}'}
    assert "QSECRETXYZ" not in excerpt(raw, 200)
    assert "QSECRETXYZ" not in excerpt({"raw_excerpt": '{"image": "https://u:QSECRETX'}, 200)


def _record(source: UrlSource, url: str) -> dict:
    return source._record({"url": url, "caption": "c", "page": f"https://h.example/p?token={SECRET}"})


SECRET = "QSENTINELSECRET123"


def test_the_url_source_stores_and_identifies_a_url_without_its_credentials(tmp_path):
    signed = f"https://u:{SECRET}@b.example/k.png?X-Amz-Credential=AK%2F{SECRET}&X-Amz-Signature={SECRET}&w=2"
    resigned = signed.replace(SECRET, SECRET[::-1])
    source = UrlSource(str(tmp_path), FetchSettings())
    rec, again = _record(source, signed), _record(source, resigned)
    assert rec["fetch_url"] == signed  # the request still carries them
    assert SECRET not in rec["url"] and rec["url"].startswith("https://***@b.example/k.png?") and "w=2" in rec["url"]
    assert SECRET not in json.dumps(rec["extra"])
    assert rec["doc_id"] == url_doc_id(rec["url"]) == again["doc_id"]  # a re-signed URL is the same document
    refusing = UrlSource(str(tmp_path), FetchSettings(signed_urls="refuse"))
    bad = _record(refusing, signed)
    assert bad["error"] == "signed_url_refused" and SECRET not in json.dumps(bad)
    plain = _record(refusing, "https://b.example/k.png?w=2")
    assert "error" not in plain and plain["url"] == plain["fetch_url"] == "https://b.example/k.png?w=2"


def test_credentials_setting_is_checked():
    from pydantic import ValidationError

    from pipelines.ingest.config import FetchOptions

    assert FetchOptions().settings().signed_urls == "strip" and not FetchOptions().settings().allow_private
    assert FetchOptions(signed_urls="refuse", allow_private=True).settings().allow_private
    with pytest.raises(ValidationError):
        FetchOptions(signed_urls="keep")


def test_percent_encoded_and_upper_case_names():
    assert redact_url(f"https://h/x?X-Amz-%53ignature={SECRET}") == "https://h/x?X-Amz-%53ignature=***"
    assert redact_url(f"https://h/x?X-AMZ-SIGNATURE={SECRET}&{quote('a b')}=1") == "https://h/x?X-AMZ-SIGNATURE=***&a%20b=1"


def test_a_manifest_url_with_credentials_is_refused_when_asked(tmp_path):
    from pipelines.ingest.sources.manifest import ManifestSource

    url = f"https://u:{SECRET}@b.example/k.png?sig={SECRET}"
    manifest = str(tmp_path / "m.jsonl")
    strip = ManifestSource(manifest, fetch=FetchSettings())._image(url, manifest)
    assert "error" not in strip  # fetched as given; the excerpt and detail are redacted downstream
    refused = ManifestSource(manifest, fetch=FetchSettings(signed_urls="refuse"))._image(url, manifest)
    assert refused["error"] == "signed_url_refused" and SECRET not in refused["error_detail"]


def test_the_policy_flags_are_settings_not_credentials():
    """``allow_private`` holds a secret word (``private``) but a flag says whether, never what:
    the config's secret check lets a boolean through and still refuses a value."""
    from jobs import common
    from pipelines.ingest.config import IngestConfig

    cfg = common.load_config(IngestConfig, None, ["source.kind=urls", "source.path=/tmp/x.jsonl",
                                                  "source.fetch.allow_private=true",
                                                  "source.fetch.signed_urls=refuse"], {})
    assert cfg.source.fetch.allow_private and cfg.source.fetch.signed_urls == "refuse"
    with pytest.raises(SystemExit) as exc:
        common.load_config(IngestConfig, None, [f"source.fetch.private_key={SECRET}"], {})
    assert "private_key" in str(exc.value) and SECRET not in str(exc.value)  # named, never echoed
