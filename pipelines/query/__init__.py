"""Reading the vector tables: ``search`` (vector, BM25, hybrid over a published version),
``metrics`` (MRR, NDCG, graded NDCG, Recall that agree with trec_eval), ``evaluation``
(runs from a table or a checkpoint, scored), ``config`` and ``evaluation_run`` (the typed
``ciea evaluate`` config and its run), ``report`` (variants side by side: JSON, Markdown,
charts).
"""
