"""Training on Ray: ``examples`` (records → the model library's ``Document`` /
``TrainExample``), ``dataset`` (Ray Data training examples from the Delta tables),
``negatives`` (stage-2 hard negatives: mining and drawing), ``worker`` (the typed job
config, checkpoints and the loop every Ray Train worker runs).
"""
