"""The training wing: one configuration trained by Ray Train + DeepSpeed and logged to MLflow.

``experiment`` (one call per configuration: the data, the run, the export), ``driver`` (the ``TorchTrainer``),
``worker`` (the per-worker loop), ``collate`` (padding), ``data`` (LLaVA instruction JSON -> Ray Data).
"""
