"""What an evaluation runs: the model (``ModelSpec``) and the inference setting (``Setting``: method and keep
ratios), the model loaded for a setting, and one timed batch of greedy answers (``timed_generate``), shared by the
batch inference (``pipelines.eval.inference``) and the latency measurement (``pipelines.eval.latency``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lvpruning import LVPruningModel, PruningConfig, attach, from_pretrained, load_decision_modules
from lvpruning.lrs_vqa import PyramidModel
from lvpruning.policies import METHODS, NONE, POLICIES, PYRAMID, PruningPolicy, get_policy, is_trained
from lvpruning.region_focus import load_region_focus
from pipelines.cluster import for_every_node
from pipelines.conversation import load_processor
from pipelines.images import batch_images, token_types
from pipelines.storage import local_copy


@dataclass(frozen=True)
class ModelSpec:
    """The model every actor loads. ``modules``: a directory of trained decision modules; ``pruning``: the
    stages of fresh (untrained) modules for the training-free policies when there are no trained ones;
    ``region_focus``: a trained Region Focus Module, for LRS-VQA's pyramid (method ``lrs_vqa``)."""

    name_or_path: str
    modules: str | None = None
    pruning: PruningConfig | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    processor_options: tuple[tuple[str, int], ...] = ()  # model.processor's (e.g. Qwen-VL's max_pixels)
    region_focus: str | None = None
    flops_image_size: tuple[int, int] | None = None  # (H, W) the FLOPs count assumes (eval.flops_image_size)

    def needs_region_focus(self) -> str:
        """``region_focus``, which the ``lrs_vqa`` settings need; an error naming the key when it is not set."""
        if self.region_focus is None:
            raise ValueError(f"method {PYRAMID!r} needs a trained Region Focus Module: set eval.lrs_vqa.region_focus")
        return self.region_focus

    def processor(self) -> Any:
        """The model's own processor, with ``processor_options``."""
        return load_processor(self.name_or_path, self.processor_options)

    @property
    def model_id(self) -> str:
        return Path(self.name_or_path.rstrip("/")).name

    def for_every_node(self, storage_path: str) -> ModelSpec:
        """This spec with its model and modules where every node of the cluster reads them
        (:func:`pipelines.cluster.for_every_node`: copied to ``storage_path`` if only this node has them)."""
        model = for_every_node(self.name_or_path, "model.name_or_path", storage_path)
        modules = for_every_node(self.modules, "eval.modules", storage_path)
        focus = for_every_node(self.region_focus, "eval.lrs_vqa.region_focus", storage_path)
        return replace(self, name_or_path=model, modules=modules, region_focus=focus)


@dataclass(frozen=True)
class Setting:
    """One inference setting: ``method`` in ``METHODS`` and, unless ``none``, a keep ratio per stage, after
    ``layers`` (None: the model's ``pruning.layers``, where LVPruning's decision modules sit; -1 first: the vision
    tower), with the method's own ``params`` (e.g. VFlowOpt's ``t``, ``alpha``, ``cell``; a mapping or pairs).
    ``lrs_vqa`` (LRS-VQA's pyramid) keeps a share per scoring round, coarsest first, and takes no layers; its one
    parameter is ``base_long_side``, the coarsest tiled level's long side in pixels."""

    method: str
    keep_ratios: tuple[float, ...] | None = None
    seed: int = 0  # the random policy's
    layers: tuple[int, ...] | None = None
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {list(METHODS)}")
        ratios = None if self.keep_ratios is None else tuple(float(r) for r in self.keep_ratios)
        if (self.method == NONE) != (ratios is None) or ratios == ():
            raise ValueError(f"method {self.method!r}: keep_ratios, one per stage, for the pruning methods only")
        if self.layers is not None and (ratios is None or len(self.layers) != len(ratios)):
            raise ValueError(f"method {self.method!r}: layers {self.layers} need one keep ratio each, got {ratios}")
        params = dict(self.params)
        if self.method == PYRAMID and (self.layers is not None or set(params) - {"base_long_side"}):
            raise ValueError(f"method {PYRAMID!r} takes keep ratios per scoring round and base_long_side, no layers")
        object.__setattr__(self, "keep_ratios", ratios)
        object.__setattr__(self, "layers", None if self.layers is None else tuple(int(i) for i in self.layers))
        object.__setattr__(self, "params", tuple(sorted((str(k), float(v)) for k, v in params.items())))

    @property
    def name(self) -> str:
        """A file-system safe name, e.g. ``lvpruning_0.5-0.3-0.1``, ``fastv_L1_0.5`` at its own layers, or
        ``vflowopt_L-1-0-1_0.3-0.3-0.2_alpha=0.5_t=2`` with its own parameters."""
        if self.keep_ratios is None:
            return NONE
        at = "" if self.layers is None else f"L{'-'.join(map(str, self.layers))}_"
        own = "".join(f"_{k}={v:g}" for k, v in self.params)
        return f"{self.method}_{at}{'-'.join(f'{r:g}' for r in self.keep_ratios)}{own}"

    @property
    def base_long_side(self) -> int | None:
        """``lrs_vqa``'s coarsest tiled level's long side in pixels (None: the pyramid's default)."""
        value = dict(self.params).get("base_long_side")
        return None if value is None else int(value)

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"method": self.method, "keep_ratios": list(self.keep_ratios or ())}
        if self.layers is not None:
            meta["layers"] = list(self.layers)
        if self.params:
            meta["params"] = dict(self.params)
        return meta | {"seed": self.seed} if self.method in POLICIES and POLICIES[self.method].seeded else meta


def reads_whole_images(settings: Sequence[Setting]) -> bool:
    """Whether any of ``settings`` is LRS-VQA's pyramid, which reads each image whole (``whole_*`` inputs)."""
    return any(s.method == PYRAMID for s in settings)


def setting_policy(model: nn.Module, setting: Setting) -> PruningPolicy | None:
    """The policy that ranks the tokens under ``setting`` on ``model`` (None for ``none``), its schedule checked
    against the model (a bad setting fails before any answering)."""
    if setting.method == NONE:
        return None
    policy = get_policy(setting.method, setting.seed, model.decision_modules, dict(setting.params))
    model.schedule(policy, setting.layers, setting.keep_ratios)
    return policy


def load_model(spec: ModelSpec, method: str, device: str | torch.device = "cpu") -> nn.Module:
    """The base model (``none``), or it with decision modules in inference mode (:func:`with_pruning`) (``lrs_vqa``:
    the base model; :func:`load_settings` puts the pyramid around it)."""
    dtype, attn = getattr(torch, spec.dtype), spec.attn_implementation
    model = from_pretrained(local_copy(spec.name_or_path), dtype=dtype, attn_implementation=attn)
    model = model.to(device).eval()
    return model if method in (NONE, PYRAMID) else with_pruning(model, spec, method)


def with_pruning(model: nn.Module, spec: ModelSpec, method: str) -> LVPruningModel:
    """``model`` with the trained decision modules when given, else, for the training-free policies (which only
    read the stages), fresh ones at ``spec.pruning``'s stages; in inference mode."""
    if spec.modules is not None:
        return load_decision_modules(model, local_copy(spec.modules)).eval()
    if is_trained(method):
        raise ValueError(f"method {method!r} needs trained decision modules: give ModelSpec.modules (--modules DIR)")
    if spec.pruning is None:
        raise ValueError(f"method {method!r} without trained modules needs ModelSpec.pruning (the stages)")
    return attach(model, spec.pruning).eval()


def load_settings(
    spec: ModelSpec, settings: Sequence[Setting], device: str | torch.device = "cpu"
) -> dict[str, tuple[nn.Module, PruningPolicy | None]]:
    """One base model, and for the pruning methods one set of decision modules on it, serving every setting:
    setting name -> (the model it runs, its policy). Each setting's schedule is checked against the model first.
    ``lrs_vqa`` settings run the same base model inside a :class:`PyramidModel` with ``spec.region_focus``."""
    base = load_model(spec, NONE, device)
    pruning = [s.method for s in settings if s.method not in (NONE, PYRAMID)]
    trained = [m for m in pruning if is_trained(m)]  # named in the error when the modules are missing
    pruner = with_pruning(base, spec, (trained or pruning)[0]) if pruning else None
    served: dict[str, tuple[nn.Module, PruningPolicy | None]] = {}
    for s in settings:
        if s.method == NONE:
            served[s.name] = (base, None)
        elif s.method == PYRAMID:
            served[s.name] = (pyramid_model(base, spec, s), None)
        else:
            served[s.name] = (pruner, setting_policy(pruner, s))
    return served


def pyramid_model(base: nn.Module, spec: ModelSpec, setting: Setting) -> PyramidModel:
    """``base`` inside LRS-VQA's pyramid with the trained Region Focus Module ``spec.region_focus`` (loaded onto
    ``base``'s device and dtype) at ``setting``'s ``base_long_side``."""
    focus = load_region_focus(base, local_copy(spec.needs_region_focus()))
    return PyramidModel(base, focus, setting.base_long_side)


def left_padded(prompts: list[np.ndarray], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (each (L_i,)) padded on the left into one batch: input_ids and attention_mask, (B, N)."""
    B, N = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, N), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, N, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, N - len(prompt) :] = torch.from_numpy(np.asarray(prompt, dtype=np.int64))
        attention_mask[b, N - len(prompt) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def timed_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[np.ndarray],
    images: dict[str, Any],
    setting: Setting,
    policy: Any,
    max_new_tokens: int,
    prefill: list[Any] | None = None,
) -> tuple[list[str], float, float]:
    """Greedy answers for prompts (each (L_i,)) and their ``images`` (``pixel_values``: B arrays (3, H, W), or
    (S_b, 3, H, W) with ``image_sizes`` for the tiled families, or (P_b, D) with ``image_grid_thw`` for Qwen-VL:
    :func:`pipelines.images.batch_images`), left-padded into one batch, with the wall times
    (ms) of the prefill and of the whole call. ``model``: the base model for ``none``, a :class:`PyramidModel` for
    ``lrs_vqa`` (prompts with one unexpanded image token, whole normalised images), else an :class:`LVPruningModel`
    (``policy`` ranks the tokens). ``prefill``: a list that receives the prefill's output (the pyramid's tiles
    encoded). On GPU the device is synchronized at each clock read."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id)
    N = input_ids.shape[1]
    dtype = next(model.parameters()).dtype
    pixels = None if isinstance(model, PyramidModel) else dtype  # the pyramid resizes in fp32, casts its tiles
    inputs = {k: v.to(device, pixels if k == "pixel_values" else None) for k, v in batch_images(images).items()}
    inputs |= {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    pruner = isinstance(model, (LVPruningModel, PyramidModel))
    if not pruner:
        inputs = token_types(inputs, model.config.image_token_id)
    inputs["max_new_tokens"] = max_new_tokens
    inputs |= {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    prefill_end: list[float] = []  # the first forward pass is the prefill (HF's and the pruner's generate)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def hook_fn(module: nn.Module, args: Any, output: Any) -> None:  # None: a hook's return replaces the output
        if not prefill_end:
            prefill_end.append(clock())
            if prefill is not None:
                prefill.append(output)

    hook = model.register_forward_hook(hook_fn)
    try:
        start = clock()
        if pruner:
            tokens = model.generate(**inputs, keep_ratios=setting.keep_ratios, policy=policy, layers=setting.layers)
        else:
            tokens = model.generate(**inputs, do_sample=False)
        end = clock()
    finally:
        hook.remove()
    texts = [t.strip() for t in tokenizer.batch_decode(tokens[:, N:].cpu(), skip_special_tokens=True)]
    return texts, 1e3 * (prefill_end[0] - start), 1e3 * (end - start)
