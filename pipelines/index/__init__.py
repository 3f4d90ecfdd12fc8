"""Indexing the corpus into LanceDB: ``embed`` (the Ray Data embedding stage), ``config``
(the typed settings of the indexing runs), ``build`` (``ciea embed``'s run: a Delta version
into an indexed, published table), ``reindex_plan`` (what changed in Delta since a table was
indexed, and what to do about it) and ``reindex`` (``ciea reindex``'s run: the change set or
a gated rebuild, crash-safe).
"""
