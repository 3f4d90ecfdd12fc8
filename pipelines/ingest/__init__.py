"""Corpus ingestion: sources → validation → Delta Lake (``corpus/documents``,
``corpus/quarantine``, ``queries/<split>``, ``qrels/<split>``), run by ``ciea ingest``.

Modules, one per stage: ``config`` (the run's typed settings), ``sources/`` (one reader per
corpus format, the synthetic corpus included), ``validation`` (normalise, check, hash),
``runner`` (Ray Data wiring, duplicate rule, commit, and ``run(config)``). The tables,
schemas and URIs they write through are in :mod:`pipelines.store`.
"""
