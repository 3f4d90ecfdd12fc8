"""Integration tier: the modules share the session's local Ray (``ray_local``, in
``tests/conftest.py``, which the e2e tier shares too), session files under /tmp.

Ray 2.60 turns token authentication on and writes ``~/.ray/auth_token`` unless told
otherwise; these single-machine test clusters run with it off so nothing is written
outside the repository and /tmp (subprocesses inherit the setting).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The unit tier's offline tokenizers, for the multi-process model tests kept here.
from unit.conftest import corpus_texts, synthetic_corpus, tokenizer_dirs  # noqa: E402, F401
