"""Ingest sources: one small module per corpus format (see each module's docstring)."""

from __future__ import annotations

from .base import Query, Source
from .edis import EDISSource
from .folder import FolderSource
from .manifest import ManifestSource
from .synthetic import SyntheticSource
from .webqa import WebQASource

__all__ = ["EDISSource", "FolderSource", "ManifestSource", "Query", "Source", "SyntheticSource",
           "WebQASource"]
