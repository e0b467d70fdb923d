"""The frontier wing: the accuracy-versus-TFLOPs Pareto frontier over MLflow runs, tagged and plotted.

``pareto`` (the fronts and their table), ``run`` (the frontier run: tags, CSV, plots), ``plots`` (PNG, HTML).
Reads MLflow only: imports no other wing, but the evaluation's metric names (``pipelines.eval.metrics``, constants).
"""
