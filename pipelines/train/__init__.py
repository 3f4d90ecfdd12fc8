"""Training on Ray: ``examples`` (records → the model library's ``Document`` /
``TrainExample``), ``dataset`` (Ray Data training examples from the Delta tables),
``negatives`` (stage-2 hard negatives: mining), ``draws`` (each epoch's positive and hard
negatives per query, pure functions of seed, epoch and qid), ``config`` (the typed job
config and the resume identity), ``checkpoints`` (what a checkpoint holds, which one a
re-run resumes from), ``driver`` (the run: checks before Ray, datasets, ``TorchTrainer``,
outputs), ``worker`` (the loop every Ray Train worker runs), ``gradients``
(data-parallel gradient averaging), ``profiling`` (per-phase step cost), ``curves`` (the
metrics log and its plot), ``compare`` (``ciea compare``: every variant trained in-process
with the same step and draws, no Ray).
"""
