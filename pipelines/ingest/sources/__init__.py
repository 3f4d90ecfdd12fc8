"""Ingest sources: one small module per corpus format (see each module's docstring)."""

from __future__ import annotations

from pipelines.ingest.sources.base import Query, Source
from pipelines.ingest.sources.edis import EDISSource
from pipelines.ingest.sources.folder import FolderSource
from pipelines.ingest.sources.manifest import ManifestSource
from pipelines.ingest.sources.synthetic.source import SyntheticSource
from pipelines.ingest.sources.urls import UrlSource
from pipelines.ingest.sources.webdataset import WebDatasetSource
from pipelines.ingest.sources.webqa import WebQASource

__all__ = ["EDISSource", "FolderSource", "ManifestSource", "Query", "Source", "SyntheticSource",
           "UrlSource", "WebDatasetSource", "WebQASource"]
