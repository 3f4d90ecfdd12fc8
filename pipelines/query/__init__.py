"""Reading the vector tables: ``search`` (vector, BM25, hybrid over a published version),
``metrics`` (MRR, NDCG, Recall that agree with trec_eval), ``evaluation`` (runs from a
table or a checkpoint, scored), ``report`` (variants side by side: JSON, Markdown, charts).
"""
