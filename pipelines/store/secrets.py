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
from urllib.parse import urlsplit, urlunsplit

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


def _redact_pairs(text: str) -> str:
    """``a=1&sig=xyz`` → ``a=1&sig=***``: the values of secret-looking parameters."""
    out = []
    for pair in text.split("&"):
        name, eq, _ = pair.partition("=")
        out.append(f"{name}={MASK}" if eq and looks_secret(name) else pair)
    return "&".join(out)


def redact_url(url: str) -> str:
    """``url`` without the credentials it carries: the userinfo (``user:password@``) and the
    values of secret-looking query or fragment parameters (``X-Amz-Signature``, ``sig``,
    ``token``, ``access_token``) become ``***``. Anything that is not a URL comes back as is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_pairs(parts.query), _redact_pairs(parts.fragment)))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (a log line, an error message) through :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


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
