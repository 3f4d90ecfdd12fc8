"""Corpus ingestion: sources → validation → Delta Lake (``corpus/documents``,
``corpus/quarantine``, ``queries/<split>``, ``qrels/<split>``), run by ``ciea ingest``.

Modules, one per stage: ``sources/`` (readers), ``validation`` (normalise, check, hash),
``runner`` (Ray Data wiring, duplicate rule, commit), ``delta_store`` (tables and merges),
``schema`` (column names and Arrow schemas), ``storage`` (local and ``s3://`` URIs).
"""
