"""The evaluation wing: benchmark inference with Ray Data, scoring, TFLOPs and latency per setting.

``evaluation`` (settings x benchmarks -> MLflow runs), ``inference`` (Ray Data batch inference, resumable answer
files), ``models`` (a setting's model and policy), ``latency``, ``datasets`` (the benchmarks' prompts and names),
``scoring`` (the nine scorers), ``score`` (their command line). Never imports the training wing.
"""
