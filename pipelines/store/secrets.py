"""Secrets: which names carry one, and keeping them out of what a run prints or writes.

Credentials reach ciea only through the environment (the object stores' own variables, read
by deltalake, Lance and pyarrow themselves). Everything a run writes — resolved configs,
summaries, log lines — goes through :func:`redact` or :func:`redact_text` on the way out, so
a secret that slipped past the checks (a presigned URL, ``user:password@`` in a URI) is
replaced by ``***`` rather than stored. The rule is by name, not by a fixed list: any key
whose words include ``key``, ``secret``, ``token``, ``password``, ``credential``,
``signature``, … (:func:`looks_secret`), so a new provider's option or a misspelling is
covered too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

#: What replaces a secret.
MASK = "***"

#: Words that make a name secret-bearing (``client_secret``, ``sas_token``, ``apiKey``).
SECRET_WORDS = frozenset({
    "key", "token", "secret", "password", "passwd", "pwd", "passphrase", "credential",
    "credentials", "sas", "sig", "signature", "private", "auth", "authorization", "bearer", "session", "cert",
    "cookie", "apikey", "accesskey", "secretkey", "privatekey",
})
#: Word stems that make a name secret-bearing wherever they start a word (``passwords``, ``secretkey``).
SECRET_STEMS = ("secret", "passw", "credential", "signature", "apikey", "privatekey")
#: A secret word followed by one of these names *about* a secret, not the secret itself
#: (``pad_token_id``, ``key_type``, ``session_name``): not masked.
NOT_THE_VALUE = frozenset({"id", "ids", "type", "types", "count", "len", "length", "limit", "size", "name", "names",
                           "dir", "column", "columns", "field", "fields", "algorithm", "enabled"})
#: Identifiers that are credentials all the same (an access key id names the key pair).
CREDENTIAL_IDS = frozenset({"aws_access_key_id", "access_key_id", "x_amz_credential"})

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_PAIR_SEP = re.compile(r"([&;])")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")


def words(name: str) -> list[str]:
    """``"X-Amz-Signature"`` → ``["x", "amz", "signature"]``; ``"apiKey"`` → ``["api", "key"]``."""
    return [w.lower() for w in _WORD.findall(str(name))]


def looks_secret(name: object) -> bool:
    """Whether a key, option or parameter named ``name`` would carry a secret.

    Args:
        name: A config key, storage option, URL query parameter or header name, any case.

    Returns:
        True when one of its words is a secret word (:data:`SECRET_WORDS`, :data:`SECRET_STEMS`)
        not followed by a word that makes it a name about the secret (``token_id``), or it is a
        credential identifier (:data:`CREDENTIAL_IDS`).
    """
    ws = words(str(name))
    if "_".join(ws) in CREDENTIAL_IDS:
        return True
    for i, w in enumerate(ws):
        if i + 1 < len(ws) and ws[i + 1] in NOT_THE_VALUE:
            continue
        if w in SECRET_WORDS or w.startswith(SECRET_STEMS):
            return True
    return False


def _secret_parameter(name: str) -> bool:
    # Parameter names arrive percent-encoded and in any case (``X-AMZ-SIGNATURE``, ``%73ig``).
    name = unquote_plus(name)
    return looks_secret(name) or looks_secret(name.lower())


def _redact_pairs(text: str) -> str:
    """``a=1&sig=xyz`` → ``a=1&sig=***``: the values of secret-looking parameters (``&`` or
    ``;`` separated)."""
    out = []
    for pair in _PAIR_SEP.split(text):
        name, eq, _ = pair.partition("=")
        out.append(f"{name}={MASK}" if eq and _secret_parameter(name) else pair)
    return "".join(out)


def _cut_userinfo(netloc: str) -> bool:
    """Whether ``netloc`` looks like ``user:pass`` cut before its ``@`` (an excerpt's end):
    a "port" that is not a number."""
    if "@" in netloc or netloc.startswith("[") or ":" not in netloc:
        return False
    port = netloc.rsplit(":", 1)[1]
    return bool(port) and not port.isdigit()


def _redact_loose(url: str) -> str:
    """:func:`redact_url` for a URL ``urlsplit`` refuses (``http://u:p@[bad``): the same
    masking, found by position."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority or _cut_userinfo(authority):
        authority = f"{MASK}@{authority.rsplit('@', 1)[1]}" if "@" in authority else MASK
    cut = next((i for i, c in enumerate(tail) if c in "?#"), len(tail))
    pieces = re.split(r"([?#])", tail[cut:])
    tail = tail[:cut] + "".join(p if p in ("?", "#") else _redact_pairs(p) for p in pieces)
    return f"{scheme}://{authority}{tail}"


def redact_url(url: str) -> str:
    """``url`` without the credentials it carries: the userinfo (``user:password@``) and the
    values of secret-looking query or fragment parameters (``X-Amz-Signature``,
    ``X-Amz-Credential``, ``sig``, ``token``, ``access_token``, ``api_key``: :func:`looks_secret`)
    become ``***``. A URL with none comes back exactly as given (it is an identity: a
    re-ingest must find it again); anything that is not a URL comes back as is.

    This is the one rule for every URL ciea writes: stored URLs (``metadata.url``,
    ``final_url``), quarantine details and excerpts, log lines, summaries."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _redact_loose(url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    elif _cut_userinfo(netloc):
        netloc = MASK
    query, fragment = _redact_pairs(parts.query), _redact_pairs(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def url_has_credentials(url: str) -> bool:
    """Whether :func:`redact_url` would hide anything in ``url``."""
    return redact_url(url) != url


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (a log line, an error message) through :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL.sub(_redact_match, text)


def _redact_match(m: re.Match) -> str:
    # Punctuation after a URL ends the sentence, not the URL ("GET <url>: HTTP 404"): kept
    # outside it, so that redacting twice gives the same text.
    url = m.group(0)
    core = url.rstrip(".,;:!?)]}")
    return redact_url(core) + url[len(core):]


def redact(obj: Any) -> Any:
    """A copy of ``obj`` safe to write: the value of every secret-looking key
    (:func:`looks_secret`) is ``***``, every string has its URLs redacted
    (:func:`redact_text`); dicts, lists and tuples are walked, other values kept.

    Args:
        obj: A config dump, a summary, anything JSON-like.

    Returns:
        The redacted copy; ``obj`` itself is not changed.
    """
    if isinstance(obj, dict):
        return {k: MASK if _masked(k, v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _masked(key: Any, value: Any) -> bool:
    # None and flags say whether a secret is used (``aws_skip_signature: "true"``), not what it is.
    if value is None or isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return False
    return looks_secret(key)


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = True, allow_nan: bool = True) -> None:
    """Writes ``obj`` as indented JSON with secrets redacted (:func:`redact`): every resolved
    config, summary and report a run writes goes through here, so none holds a credential.
    Paths, enums and other non-JSON values are written as their ``str``; ``sort_keys=False``
    keeps the order where it means something (config fields, a report's variants)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(obj, default=str))
    path.write_text(json.dumps(redact(plain), indent=2, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")
