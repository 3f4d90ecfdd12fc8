"""The synthetic corpus: ``generator`` (documents whose images carry what their captions
omit, and the queries that ask for it; the embedded default of the demo and the tests) and
``source`` (the same corpus as a ``ciea ingest`` source).
"""
