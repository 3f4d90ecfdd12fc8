"""Storage every phase shares: the only place phases meet.

``storage`` (local and ``s3://`` URIs, storage options), ``schema`` (column names and Arrow
schemas of every Delta table), ``delta_tables`` (the Delta table handle and the merges
that make ingest idempotent), ``documents`` (the one rows → ``Document`` converter every
phase reads the corpus with), ``lance_tables`` (the LanceDB vector table: layout, lineage
guard, distributed commits, indexes, published versions).
"""
