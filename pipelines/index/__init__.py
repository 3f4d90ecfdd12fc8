"""Indexing the corpus into LanceDB: ``embed`` (the Ray Data embedding stage) and
``reindex_plan`` (what changed in Delta since a table was indexed, and what to do about it).
"""
