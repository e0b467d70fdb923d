"""The sweep wing: Ray Tune + Optuna over LVPruning configurations and the training-free baselines.

``tuner`` (the Tuner, its searchers and schedulers, the trial), ``space`` (the search space), ``calibration``
(label-free calibration by hidden-state similarity). Trains through the training wing, evaluates through the
evaluation wing.
"""
