"""LVPruning: language-guided vision token pruning for LLaVA-style multimodal LLMs.

Example::

    from lvpruning import PruningConfig, attach, from_pretrained

    model = from_pretrained("llava-hf/llava-1.5-7b-hf")  # or llava-v1.6-*, llava-onevision-* (image_sizes=...),
    # Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*, Qwen/Qwen3-VL-* (image_grid_thw=...)
    pruner = attach(model, PruningConfig(layers=(1, 8, 16), infer_ratios=(0.5, 0.3, 0.1)))
    pruner.train()   # training mode: masked attention, LM + ratio loss
    pruner.eval()    # inference mode: vision tokens removed, ratios per call
    base = pruner.detach()
"""

from lvpruning.adapters import from_pretrained
from lvpruning.checkpoint import load_decision_modules, read_pruning_config, save_decision_modules
from lvpruning.config import PruningConfig, paper_schedule
from lvpruning.decision import DecisionModule
from lvpruning.engine import LVPruningModel, LVPruningOutput, attach
from lvpruning.stage import keep_count

__all__ = [
    "DecisionModule",
    "LVPruningModel",
    "LVPruningOutput",
    "PruningConfig",
    "attach",
    "from_pretrained",
    "keep_count",
    "load_decision_modules",
    "paper_schedule",
    "read_pruning_config",
    "save_decision_modules",
]
