"""Everything between the model library and the jobs, one folder per phase.

``store/`` (URIs, schemas, the Delta and LanceDB tables: where phases meet), ``ingest/``
(sources → validation → Delta), ``train/`` (examples, hard negatives, the Ray Train worker),
``index/`` (the embedding stage, re-index plans), ``query/`` (search, metrics, evaluation,
reports), ``web/`` (the search page).
"""
