"""Reading the vector tables: ``search`` (vector, BM25, hybrid over a published version),
``search_run`` (the typed ``ciea search`` config, its run and its printed results), ``sql``
(read-only, bounded DuckDB SQL over the tables: ``ciea sql``), ``formatting`` (result rows
as a text table, Markdown, CSV or JSON, for both), ``metrics`` (MRR, NDCG, graded NDCG,
Recall that agree with trec_eval), ``evaluation`` (runs from a table or a checkpoint,
scored), ``config`` and ``evaluation_run`` (the typed ``ciea evaluate`` config and its run),
``report`` (variants side by side: JSON, Markdown, charts).
"""
