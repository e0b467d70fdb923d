"""The MLflow names of the metrics an evaluated setting's run holds, owned by the evaluation that logs them
(``pipelines.eval.evaluation``, ``pipelines.eval.latency``) and read by the sweep and the frontier. Constants
only: the frontier job imports them without torch or Ray."""

TFLOPS = "tflops"  # the analytic prefill TFLOPs, 1 image + 30 text tokens (lrs_vqa: the mean over its questions)
TFLOPS_BOUND = "tflops_bound"  # lrs_vqa: the most one prompt can cost its pyramid (every tile visited selected)
MEAN = "accuracy/mean"  # the mean over the benchmarks of ``accuracy/<benchmark>``
PREFILL_MS = "latency/prefill_ms"  # median first forward pass (``<name>_iqr``: its spread)
E2E_MS = "latency/e2e_ms"  # median whole generate call


def interval_names(accuracy: str) -> tuple[str, str]:
    """The metrics holding the 95% bootstrap interval of ``accuracy`` (``accuracy/mean`` or ``accuracy/<benchmark>``):
    ``ci_low/<accuracy>``, ``ci_high/<accuracy>``."""
    return f"ci_low/{accuracy}", f"ci_high/{accuracy}"
