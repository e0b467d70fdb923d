"""Prefill FLOPs of LLaVA with and without LVPruning: an analytic count and a measured count on ``meta``.

Convention (paper section 4.1, Fig. 1): one image plus ``T`` text tokens (``T = 30``), batch 1, one forward
pass (the prefill). LLaVA-1.5 sees the image as one 336 x 336 tile; LLaVA-NeXT and LLaVA-OneVision ("anyres") see
an image of any size as a base tile plus a grid of tiles (``image_layout``; 672 x 672 unless given); Qwen2-VL and
Qwen2.5-VL see it at its own resolution (672 x 672 unless given; the tower: ``lvpruning.flops_qwen``). Only matrix
multiplications are counted, ``2 m n k`` FLOPs each (a multiply-add is 2 FLOPs), as
``torch.utils.flop_counter.FlopCounterMode`` counts them; norms, activations, softmax, RoPE and
residual adds are ignored. Attention is counted as full ``N x N`` matmuls even when causal, as the counter
does. The measured count runs the real HF modules on the ``meta`` device, so LLaVA-1.5-7B needs no weights.
How these numbers relate to the paper's Table 1: ``docs/flops.md``. CLI: ``python -m lvpruning.flops``
(``lvpruning.flops_cli``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.llava_next import modeling_llava_next
from transformers.models.llava_onevision import modeling_llava_onevision

from lvpruning.config import PruningConfig, check_schedule
from lvpruning.engine import attach
from lvpruning.flops_qwen import is_qwen_vl, patch_grid, positions_on_meta, vision_tower_flops, zero_positions
from lvpruning.layout import BASE, NEWLINE, packed_cells
from lvpruning.policies import POLICIES, PruningPolicy, get_policy, is_trained
from lvpruning.presets import AnyLlavaConfig
from lvpruning.stage import StageShape, keep_count

TOLERANCE = 0.02  # analytic and measured counts must agree within 2%
LogitPositions = Literal["all", "last"]
# q/k/v/o projections + gated (SwiGLU) MLP; Qwen-VL's M-RoPE, Qwen3-VL's q/k norms and DeepStack adds: no matmul
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text"}
TERA = 1e12  # FLOPs per TFLOP
_CHECK_SWITCH = "TRANSFORMERS_DISABLE_TORCH_CHECK"
ANYRES_IMAGE_SIZE = (672, 672)  # (H, W) when LLaVA-NeXT / OneVision are given no image size
_TOWERS_WITH_CLS = {"clip_vision_model": True, "siglip_vision_model": False}
MODEL_CLASSES: dict[type[PreTrainedConfig], type[PreTrainedModel]] = {
    LlavaConfig: LlavaForConditionalGeneration,
    LlavaNextConfig: LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig: LlavaOnevisionForConditionalGeneration,
    Qwen2VLConfig: Qwen2VLForConditionalGeneration,
    Qwen2_5_VLConfig: Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig: Qwen3VLForConditionalGeneration,
}


@dataclass(frozen=True)
class ImageLayout:
    """How one ``image_size`` (H, W) image reaches the decoder: the tower runs on ``num_tiles`` square crops of
    ``tile_size`` pixels (anyres: the base view, then a grid of ``grid`` (rows, cols) tiles; LLaVA-1.5: the base
    view only, grid (0, 0)), the projector on ``tile_tokens`` tokens of each; after unpadding the grid (and
    OneVision's downscaling) and one image_newline per grid row, ``num_vision_tokens`` (|I_V|) reach the decoder.
    Qwen-VL: ``image_size`` is the resized image, the tower runs once (``num_tiles`` 1) on its ``grid`` (h, w) of
    ``tile_size``-pixel patches (``tile_tokens`` = h * w), and the merger leaves h * w / 4 vision tokens."""

    image_size: tuple[int, int]
    tile_size: int
    grid: tuple[int, int]
    num_tiles: int
    tile_tokens: int
    num_vision_tokens: int


def tower_tokens(vision_config: PreTrainedConfig) -> int:
    """Tokens the vision tower sees per tile: its patches, plus CLS for CLIP."""
    v = vision_config
    if v.model_type not in _TOWERS_WITH_CLS:
        raise ValueError(f"unsupported vision tower {v.model_type!r}; counted: {sorted(_TOWERS_WITH_CLS)}")
    if getattr(v, "vision_use_head", False):
        raise ValueError("a SigLIP tower with its pooling head (vision_use_head) is not counted; LLaVA uses none")
    return (v.image_size // v.patch_size) ** 2 + _TOWERS_WITH_CLS[v.model_type]


def image_layout(config: AnyLlavaConfig, image_size: Sequence[int] | None = None) -> ImageLayout:
    """The tiles and vision tokens of one image of ``image_size`` (H, W), computed by Hugging Face's own anyres
    helpers (``image_size_to_num_patches``, ``get_anyres_image_grid_shape`` and the model's ``pack_image_features``
    through :func:`~lvpruning.layout.packed_cells`, so unpadding, OneVision's downscaling and the newlines are
    HF's). LLaVA-1.5 takes only its
    fixed square size; LLaVA-NeXT / OneVision default to ``ANYRES_IMAGE_SIZE``, Qwen-VL to ``QWEN_IMAGE_SIZE``
    (resized by the processor's ``smart_resize``, see :mod:`lvpruning.flops_qwen`)."""
    v = config.vision_config
    if is_qwen_vl(config):
        resized, h, w = patch_grid(config, image_size)
        return ImageLayout(resized, v.patch_size, (h, w), 1, h * w, h * w // v.spatial_merge_size**2)
    tile_tokens = tower_tokens(v) - (config.vision_feature_select_strategy == "default")  # "default" drops CLS
    if isinstance(config, LlavaConfig):
        if image_size is not None and tuple(image_size) != (v.image_size, v.image_size):
            raise ValueError(
                f"LLaVA-1.5 resizes every image to {v.image_size} x {v.image_size}; an image size of "
                f"{' x '.join(map(str, image_size))} only applies to LLaVA-NeXT, LLaVA-OneVision and Qwen-VL"
            )
        return ImageLayout((v.image_size, v.image_size), v.image_size, (0, 0), 1, tile_tokens, tile_tokens)
    if not isinstance(config, (LlavaNextConfig, LlavaOnevisionConfig)):
        raise ValueError(f"unsupported config {type(config).__name__}; counted: {[c.__name__ for c in MODEL_CLASSES]}")
    size = [int(x) for x in (image_size or ANYRES_IMAGE_SIZE)]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image size must be two positive integers H W, got {list(image_size or ())}")
    hf = modeling_llava_next if isinstance(config, LlavaNextConfig) else modeling_llava_onevision
    pinpoints, tile = config.image_grid_pinpoints, v.image_size
    num_tiles = hf.image_size_to_num_patches(size, pinpoints, tile)  # base + rows * cols
    grid = hf.get_anyres_image_grid_shape(size, pinpoints, tile)  # (rows, cols)
    num_vision = packed_cells(config, size).shape[0]
    return ImageLayout((size[0], size[1]), tile, tuple(grid), num_tiles, tile_tokens, num_vision)


def num_vision_tokens(config: AnyLlavaConfig, image_size: Sequence[int] | None = None) -> int:
    """|I_V| of one image: LLaVA-1.5's patches (plus CLS under the ``"full"`` strategy), or the anyres count of
    :func:`image_layout` (newline tokens included)."""
    return image_layout(config, image_size).num_vision_tokens


def tokens_per_layer(
    num_layers: int, layers: Sequence[int], kept: Sequence[int], num_vision: int, num_text: int
) -> tuple[int, ...]:
    """Sequence length each decoder layer sees; stage ``s`` prunes AFTER layer ``layers[s]`` (zero-based; -1: the
    vision-tower stage, before layer 0)."""
    counts, vision, stage = [], num_vision, 0
    if layers and layers[0] == -1:
        vision, stage = kept[0], 1
    for i in range(num_layers):
        counts.append(vision + num_text)
        if stage < len(layers) and i == layers[stage]:
            vision, stage = kept[stage], stage + 1
    return tuple(counts)


def decoder_layer_flops(text_config: PreTrainedConfig, num_tokens: int) -> dict[str, int]:
    """One Llama decoder layer over ``num_tokens`` positions: projections (GQA-aware), attention, MLP."""
    if text_config.model_type not in _LLAMA_LIKE:
        raise ValueError(f"unsupported text model {text_config.model_type!r}; counted: {sorted(_LLAMA_LIKE)}")
    n, hidden, heads = num_tokens, text_config.hidden_size, text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    return {
        # W_q, W_k and W_v (k/v only kv_heads wide under GQA), W_o
        "llm_qkvo": 2 * n * hidden * q_width + 2 * 2 * n * hidden * kv_width + 2 * n * q_width * hidden,
        # Q K^T and A V for every query head (K/V heads are repeated), full N x N although causal
        "llm_attention": 2 * 2 * n * n * heads * head_dim,
        "llm_mlp": 3 * 2 * n * hidden * text_config.intermediate_size,  # gate, up, down
    }


def decision_module_flops(
    hidden_size: int,
    num_queries: int,
    num_text: int,
    num_blocks: int = 2,
    ffn_dim: int | None = None,
    decision_dim: int | None = None,
) -> int:
    """One decision module (eqs. 1-4): ``num_queries`` vision tokens attend over ``num_text`` text tokens.

    A slim module (``decision_dim`` D) first projects both inputs, Linear(C, D) each; a full-width one has D = C
    and no projections. Per block: q = W_q x (eq. 1); k, v = W_k t, W_v t (eq. 2); softmax(q k^T) v (eq. 3, the
    total does not depend on the head count); FFN Linear(D, F), Linear(F, D). Then the Linear(D, 2) head (eq. 4).
    """
    d = decision_dim or hidden_size
    f, q, t = ffn_dim or 2 * d, num_queries, num_text
    projections = 2 * (q + t) * hidden_size * d if decision_dim else 0
    block = 2 * q * d * d + 2 * 2 * t * d * d + 2 * 2 * q * t * d + 2 * 2 * q * d * f
    return projections + num_blocks * block + 2 * q * d * 2


def vision_and_projector_flops(config: AnyLlavaConfig, layout: ImageLayout | None = None) -> tuple[dict[str, int], int]:
    """Vision tower (CLIP or SigLIP) + projector parts, and the FLOPs of tower layers that run but feed nothing;
    both once per tile of ``layout`` (default: :func:`image_layout` at its default size). The projector runs on
    every tile's tokens before the anyres unpadding; the image_newline tokens cost no matmul.

    LLaVA reads ``hidden_states[-2]``, yet HF's CLIP encoder runs ALL its layers: the last one is counted (it
    runs) and is also returned on its own as the unused part.
    """
    v, layout = config.vision_config, layout or image_layout(config)
    if is_qwen_vl(config):  # the merger is the projector; every block feeds the merger
        return vision_tower_flops(config, *layout.grid), 0
    seq, d = tower_tokens(v), v.hidden_size  # CLIP: patches + CLS
    patches, tiles = (v.image_size // v.patch_size) ** 2, layout.num_tiles
    per_layer = 4 * 2 * seq * d * d + 2 * 2 * seq * seq * d + 2 * 2 * seq * d * v.intermediate_size
    feature = config.vision_feature_layer
    feature = [feature] if isinstance(feature, int) else list(feature)
    # hidden_states holds the embeddings, then each layer's output: index -2 is the output of layer L - 1
    unused = tiles * (v.num_hidden_layers - max(i % (v.num_hidden_layers + 1) for i in feature)) * per_layer
    n_img, c = tiles * layout.tile_tokens, config.text_config.hidden_size
    parts = {
        "vision_patch_embed": tiles * 2 * patches * (v.num_channels * v.patch_size**2) * d,  # the stride-p conv
        "vision_layers": tiles * v.num_hidden_layers * per_layer,  # q/k/v/o, QK^T, AV, fc1, fc2
        # Linear(d * feature layers, C), GELU, Linear(C, C); several feature layers are concatenated
        "projector": 2 * n_img * d * len(feature) * c + 2 * n_img * c * c,
    }
    return parts, unused


@dataclass(frozen=True)
class FlopsReport:
    """Analytic FLOPs (not TFLOPs) of one prefill, baseline and pruned by ``method``. The method's own overhead is
    the part ``decision`` (LVPruning's decision modules) or ``policy`` (a training-free method's recomputed
    attention rows and arithmetic); ``decision_per_stage`` holds it per stage (recorded layers go to the next stage).
    """

    method: str
    num_vision_tokens: int
    num_text_tokens: int
    decision_layers: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    kept_vision_tokens: tuple[int, ...]  # k_s after each stage
    tokens_per_layer: tuple[int, ...]  # sequence length each decoder layer sees with pruning
    baseline_parts: dict[str, int]
    pruned_parts: dict[str, int]  # includes "decision" or "policy"
    decision_per_stage: tuple[int, ...]
    vision_unused: int  # inside "vision_layers": tower layers past the feature layer (they run, feed nothing)
    lm_head_positions: LogitPositions
    image_size: tuple[int, int] = (336, 336)  # (H, W) of the image
    num_tiles: int = 1  # crops the vision tower runs on (anyres: the base view + the grid)

    @property
    def baseline(self) -> int:
        return sum(self.baseline_parts.values())

    @property
    def pruned(self) -> int:
        return sum(self.pruned_parts.values())

    @property
    def decision(self) -> int:
        """The method's own overhead (decision modules or policy)."""
        return self.pruned_parts.get("decision", 0) + self.pruned_parts.get("policy", 0)

    @property
    def pruned_without_decision(self) -> int:
        return self.pruned - self.decision

    @property
    def reduction(self) -> float:
        """``1 - pruned / baseline``, decision modules included (what a deployment pays)."""
        return 1.0 - self.pruned / self.baseline

    @property
    def reduction_without_decision(self) -> float:
        return 1.0 - self.pruned_without_decision / self.baseline

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in TFLOPs."""
        n_text = self.num_text_tokens
        vision = [self.num_vision_tokens, *self.kept_vision_tokens]
        return {
            "method": self.method,
            "baseline_tflops": self.baseline / TERA,
            "pruned_tflops": self.pruned / TERA,
            "decision_tflops": self.decision / TERA,
            "pruned_without_decision_tflops": self.pruned_without_decision / TERA,
            "reduction": self.reduction,
            "reduction_without_decision": self.reduction_without_decision,
            "breakdown_tflops": {
                "baseline": {k: v / TERA for k, v in self.baseline_parts.items()},
                "pruned": {k: v / TERA for k, v in self.pruned_parts.items()},
                "decision_per_stage": [v / TERA for v in self.decision_per_stage],
                "vision_unused_layers": self.vision_unused / TERA,
            },
            "image_size": list(self.image_size),
            "num_tiles": self.num_tiles,
            "num_vision_tokens": self.num_vision_tokens,
            "num_text_tokens": n_text,
            "layers": list(self.decision_layers),
            "keep_ratios": list(self.keep_ratios),
            "tokens_per_stage": {"vision": vision, "sequence": [k + n_text for k in vision]},
            "tokens_per_layer": list(self.tokens_per_layer),
            "lm_head_positions": self.lm_head_positions,
        }


def analytic_flops(
    config: AnyLlavaConfig,
    pruning: PruningConfig,
    keep_ratios: Sequence[float] | None = None,
    num_text_tokens: int = 30,
    lm_head_positions: LogitPositions = "all",
    method: str = "lvpruning",
    layers: Sequence[int] | None = None,
    params: Mapping[str, float] | None = None,
    image_size: Sequence[int] | None = None,
) -> FlopsReport:
    """Count one prefill of 1 image + ``num_text_tokens`` text tokens, unpruned and pruned by ``method`` (a name in
    ``lvpruning.policies.POLICIES``) after ``layers`` (default ``pruning.layers``; LVPruning only there) keeping
    ``keep_ratios`` (default ``pruning.infer_ratios``), with the method's own ``params``. ``pruning`` also gives the
    decision modules' shape. ``image_size`` (H, W): LLaVA-NeXT / OneVision only (see :func:`image_layout`); keep
    ratios are fractions of the image's |I_V|, newline tokens included.

    ``lm_head_positions="all"``: logits at every position of the final sequence, as HF's forward computes by
    default (``logits_to_keep=0``); ``"last"``: only the last one, as ``generate()`` requests in the prefill.
    """
    text = config.text_config
    if method not in POLICIES:
        raise ValueError(f"unknown method {method!r}; choose from {list(POLICIES)}")
    layers = pruning.layers if layers is None else tuple(layers)
    ratios = tuple(keep_ratios if keep_ratios is not None else pruning.infer_ratios)
    _check_count(text, pruning, method, layers, ratios, num_text_tokens, lm_head_positions)
    layout = image_layout(config, image_size)
    tower = None
    if layers and layers[0] < 0 and is_qwen_vl(config):
        _check_qwen_tower(method)
    elif layers and layers[0] < 0 and not isinstance(config, LlavaConfig):
        _check_tower_tiles(config, method)
        tower = tower_passes(config, layout) if isinstance(config, LlavaNextConfig) else None
    n_vis, n_text = layout.num_vision_tokens, num_text_tokens
    kept = tuple(keep_count(r, n_vis) for r in ratios)  # k_s of eq. 13, fractions of the ORIGINAL |I_V|
    per_layer = tokens_per_layer(text.num_hidden_layers, layers, kept, n_vis, n_text)
    front, unused = vision_and_projector_flops(config, layout)
    if is_trained(method):  # decision modules: stage s scores the vision tokens still kept (|I_V|, then k_{s-1})
        shape = (pruning.num_blocks, pruning.ffn_dim, pruning.decision_dim)
        overhead = [decision_module_flops(text.hidden_size, q, n_text, *shape) for q in (n_vis, *kept[:-1])]
    else:
        policy = get_policy(method, params=params)
        overhead = policy_overhead_flops(config, policy, layers, kept, per_layer, n_text, n_vis, tower)
    return FlopsReport(
        method=method,
        num_vision_tokens=n_vis,
        num_text_tokens=n_text,
        decision_layers=layers,
        keep_ratios=ratios,
        kept_vision_tokens=kept,
        tokens_per_layer=per_layer,
        baseline_parts={**front, **llm_flops(text, [n_vis + n_text] * text.num_hidden_layers, lm_head_positions)},
        pruned_parts={
            **front,
            **llm_flops(text, per_layer, lm_head_positions),
            "decision" if is_trained(method) else "policy": sum(overhead),
        },
        decision_per_stage=tuple(overhead),
        vision_unused=unused,
        lm_head_positions=lm_head_positions,
        image_size=layout.image_size,
        num_tiles=layout.num_tiles,
    )


def _check_tower_tiles(config: AnyLlavaConfig, method: str) -> None:
    """The vision-tower stage on the tiled families: as the engine allows it (``LlavaAdapter.check_tower_stage``)."""
    policy = POLICIES[method]
    if not policy.tower_tiles:
        raise ValueError(f"{method}'s vision-tower stage (layer -1) is counted for LLaVA-1.5 only, not anyres tiles")
    if policy.tower_cls and not isinstance(config, LlavaNextConfig):
        raise ValueError(f"{method} ranks by the tower's CLS attention; OneVision's SigLIP tower has no CLS token")


def _check_qwen_tower(method: str) -> None:
    """The vision-tower stage on Qwen-VL: where it reads nothing of the tower or reads it by merged token
    (``QwenVLAdapter.check_tower_stage``'s rule)."""
    if not (POLICIES[method].tower_free or POLICIES[method].tower_merged):
        raise ValueError(f"{method}'s vision-tower stage (layer -1) is not ported to Qwen-VL's vision tower")


def tower_passes(config: LlavaNextConfig, layout: ImageLayout) -> tuple[tuple[int, ...], int]:
    """Per tower pass (the base view, then each tile) the patches that reach the decoder, and the newline tokens,
    from HF's own packing (:func:`~lvpruning.layout.packed_cells`)."""
    kind, tile = packed_cells(config, list(layout.image_size))[:, :2].unbind(-1)
    tower_pass = torch.where(kind == BASE, 0, 1 + tile)[kind != NEWLINE]
    per_pass = torch.bincount(tower_pass, minlength=layout.num_tiles)
    return tuple(per_pass.tolist()), int((kind == NEWLINE).sum())


def _check_count(
    text_config: PreTrainedConfig,
    pruning: PruningConfig,
    method: str,
    layers: tuple[int, ...],
    ratios: tuple[float, ...],
    num_text_tokens: int,
    lm_head_positions: LogitPositions,
) -> None:
    """The arguments of :func:`analytic_flops`, checked: a ``ValueError`` naming the first that is wrong."""
    check_schedule(layers, ratios, text_config.num_hidden_layers)
    pruning.check_model(text_config.num_hidden_layers, text_config.hidden_size)
    if is_trained(method) and layers != pruning.layers:
        raise ValueError(f"LVPruning's decision modules sit after layers {list(pruning.layers)}, not {list(layers)}")
    if num_text_tokens < 1:
        raise ValueError(f"num_text_tokens must be at least 1 (the decision keys), got {num_text_tokens}")
    if lm_head_positions not in ("all", "last"):
        raise ValueError(f"lm_head_positions must be 'all' or 'last', got {lm_head_positions!r}")


def llm_flops(
    text_config: PreTrainedConfig, layer_tokens: Sequence[int], lm_head_positions: LogitPositions
) -> dict[str, int]:
    """The decoder layers, layer ``i`` over ``layer_tokens[i]`` positions, and the lm_head over every position of
    the final sequence (``"all"``) or the last one."""
    parts = dict.fromkeys(("llm_qkvo", "llm_attention", "llm_mlp"), 0)
    for n in layer_tokens:
        for key, value in decoder_layer_flops(text_config, n).items():
            parts[key] += value
    positions = layer_tokens[-1] if lm_head_positions == "all" else 1
    parts["lm_head"] = 2 * positions * text_config.hidden_size * text_config.vocab_size
    return parts


def policy_overhead_flops(
    config: AnyLlavaConfig,
    policy: PruningPolicy,
    layers: tuple[int, ...],
    kept: tuple[int, ...],
    layer_tokens: Sequence[int],
    num_text: int,
    num_vision: int | None = None,
    tower: tuple[tuple[int, ...], int] | None = None,
) -> list[int]:
    """A training-free method's own FLOPs per stage (the stages after ``layers``, keeping ``kept`` of
    ``num_vision`` vision tokens (default: the config's at its default image size); decoder layer ``i`` sees
    ``layer_tokens[i]`` tokens): its overhead at each stage, the tower's at the vision-tower stage, and each recorded
    layer's in the stage that follows it. ``tower``: LLaVA-NeXT's patches per tower pass and newline tokens
    (:func:`tower_passes`), for a vision-tower stage on its tiles."""
    text = config.text_config
    num_vision = num_vision_tokens(config) if num_vision is None else num_vision
    recorded = policy.recorded_layers(layers)
    shapes = {i: stage_shape(i, layers, kept, layer_tokens, num_vision, num_text) for i in (*layers, *recorded)}
    if tower is not None and -1 in shapes:  # LLaVA-NeXT: the tower stage runs per pass
        shapes[-1] = dataclasses.replace(shapes[-1], tower_passes=tower[0], newlines=tower[1])
    overhead = [
        policy.overhead_flops(text, shapes[i]) + (policy.tower_flops(config, shapes[i]) if i < 0 else 0) for i in layers
    ]
    for i in recorded:
        overhead[shapes[i].stage] += policy.record_flops(text, shapes[i])
    return overhead


def stage_shape(
    layer: int,
    layers: tuple[int, ...],
    kept: tuple[int, ...],
    layer_tokens: Sequence[int],
    num_vision: int,
    num_text: int,
) -> StageShape:
    """The sizes at decoder layer ``layer`` (-1: the vision tower), in the first stage at or after it."""
    stage = next(s for s, after in enumerate(layers) if layer <= after)
    n = layer_tokens[layer] if layer >= 0 else num_vision + num_text  # the tower stage sees the whole prompt
    return StageShape(stage, layer, n, n - num_text, num_text, kept[stage])


# ------------------------------------------------------------------------------------------- measured count


@contextmanager
def _value_checks_off() -> Iterator[None]:
    """HF's image-placeholder check reads tensor values (``.item()``), which meta tensors lack; transformers'
    own switch ``TRANSFORMERS_DISABLE_TORCH_CHECK`` skips such checks (it changes no computation)."""
    previous = os.environ.get(_CHECK_SWITCH)
    os.environ[_CHECK_SWITCH] = "1"
    try:
        yield
    finally:
        del os.environ[_CHECK_SWITCH]
        if previous is not None:
            os.environ[_CHECK_SWITCH] = previous


def build_model(config: AnyLlavaConfig, device: str | torch.device = "meta") -> PreTrainedModel:
    """The HF model of ``config``'s family (``MODEL_CLASSES``) with its weights on ``device`` (``meta``: never
    allocated), in eval mode.

    Eager attention: SDPA's mask builder reads the mask's values (``_ignore_causal_mask_sdpa``), which meta
    cannot, and on CPU SDPA runs a fused kernel FlopCounterMode does not see. Eager runs the same matmuls.
    """
    if type(config) not in MODEL_CLASSES:
        raise ValueError(f"no model for {type(config).__name__}; counted: {[c.__name__ for c in MODEL_CLASSES]}")
    with torch.device(device):
        model = MODEL_CLASSES[type(config)]._from_config(config, attn_implementation="eager")
    return model.eval()


def dummy_inputs(
    config: AnyLlavaConfig,
    num_text_tokens: int = 30,
    device: str | torch.device = "meta",
    image_size: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The paper's dummy input, 1 image and ``num_text_tokens`` text tokens in LLaVA's prompt order (a text
    token, the image placeholders, the rest of the text); built on CPU, then moved to ``device``.

    LLaVA-NeXT / OneVision: ``pixel_values`` (1, tiles, 3, S, S) and ``image_sizes`` [[H, W]] of ``image_size``
    (see :func:`image_layout`). ``image_sizes`` stays on the CPU when ``device`` is ``meta``: HF reads its values
    (``tolist``) to choose the tile grid. Qwen-VL: the flattened patches ``pixel_values`` (h * w, D) and
    ``image_grid_thw`` [[1, h, w]] (on the CPU under ``meta`` too: HF reads it to cut the attention segments).
    """
    if num_text_tokens < 1:
        raise ValueError(f"num_text_tokens must be at least 1, got {num_text_tokens}")
    layout = image_layout(config, image_size)
    n_vis, text_id = layout.num_vision_tokens, config.text_config.bos_token_id
    if text_id is None or text_id == config.image_token_id:
        text_id = (config.image_token_id + 1) % config.text_config.vocab_size
    input_ids = torch.full((1, n_vis + num_text_tokens), text_id, dtype=torch.long)
    input_ids[0, 1 : 1 + n_vis] = config.image_token_id
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    sizes_device = "cpu" if torch.device(device).type == "meta" else device
    if is_qwen_vl(config):
        v, (h, w) = config.vision_config, layout.grid
        patch = v.in_channels * v.temporal_patch_size * v.patch_size**2  # D
        inputs["pixel_values"] = torch.zeros(h * w, patch).to(device)  # (P, D)
        inputs["image_grid_thw"] = torch.tensor([[1, h, w]], device=sizes_device)  # (1, 3): t, h, w
        return inputs
    channels, side = config.vision_config.num_channels, layout.tile_size
    if isinstance(config, LlavaConfig):
        inputs["pixel_values"] = torch.zeros(1, channels, side, side).to(device)
        return inputs
    inputs["pixel_values"] = torch.zeros(1, layout.num_tiles, channels, side, side).to(device)  # (1, tiles, 3, S, S)
    inputs["image_sizes"] = torch.tensor([layout.image_size], device=sizes_device)  # (1, 2): H, W
    return inputs


def count_flops(module: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> int:
    """Total FLOPs FlopCounterMode records for one no-grad ``module(**inputs, **kwargs)``. SDPA (the decision
    modules') runs its math backend: the same matmuls as explicit ops, where CPU's fused kernel is invisible to the
    counter (on ``meta`` SDPA decomposes into them anyway)."""
    with _value_checks_off(), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            module(**inputs, **kwargs)
    return counter.get_total_flops()


def measure_flops(
    config: AnyLlavaConfig,
    pruning: PruningConfig | None = None,
    keep_ratios: Sequence[float] | None = None,
    num_text_tokens: int = 30,
    lm_head_positions: LogitPositions = "all",
    device: str = "meta",
    method: str = "lvpruning",
    layers: Sequence[int] | None = None,
    params: Mapping[str, float] | None = None,
    image_size: Sequence[int] | None = None,
) -> int:
    """FlopCounterMode's count of one prefill on the dummy input: the plain HF forward when ``pruning`` is
    None, else ``attach(model, pruning)`` in eval mode (tokens physically removed), pruned by ``method`` after
    ``layers`` (default ``pruning.layers``) with ``keep_ratios``. Qwen-VL on ``meta``: see
    :func:`~lvpruning.flops_qwen.positions_on_meta` (the tower and the decoder run as they are; on a real device
    nothing is replaced)."""
    module: nn.Module = build_model(config, device)
    kwargs: dict[str, Any] = {"logits_to_keep": 1 if lm_head_positions == "last" else 0}
    if pruning is not None:
        with torch.device(device):  # the decision modules are created on the model's device
            module = attach(module, pruning).eval()
        kwargs["keep_ratios"] = tuple(keep_ratios if keep_ratios is not None else pruning.infer_ratios)
        kwargs["policy"] = get_policy(method, decision_modules=module.decision_modules, params=params)
        kwargs["layers"] = tuple(layers) if layers is not None else pruning.layers
    inputs = dummy_inputs(config, num_text_tokens, device, image_size)
    if is_qwen_vl(config) and pruning is None:  # HF's M-RoPE needs the token types (the processor's output)
        kwargs["mm_token_type_ids"] = (inputs["input_ids"] == config.image_token_id).int()  # (1, N)
    if not (is_qwen_vl(config) and torch.device(device).type == "meta"):
        return count_flops(module, inputs, **kwargs)
    if pruning is None:
        kwargs["position_ids"] = zero_positions(inputs["input_ids"])
    with positions_on_meta(module):
        return count_flops(module, inputs, **kwargs)


if __name__ == "__main__":
    from lvpruning.flops_cli import main

    sys.exit(main())
