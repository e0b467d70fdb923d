"""The Qwen-VL adapter: ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

An image is ``<|vision_start|>``, n x ``<|image_pad|>``, ``<|vision_end|>`` in the prompt, with n = t * h * w / 4
after the 2 x 2 ``PatchMerger``: images of different sizes give samples different numbers of vision tokens, which
the engine's per-sample counts and ``equalize_vision`` handle as for LLaVA-NeXT. ``pixel_values`` are the
processor's flattened patches (sum_b t_b * h_b * w_b, D), ``image_grid_thw`` (B, 3) each image's patch grid.

Positions are 3-D (M-RoPE): HF's own ``get_rope_index`` computes them once for the prompt, padding-aware; every kept
token keeps its (t, h, w) position (eq. 14), and decoding continues where HF's ``generate`` does (the prompt's
largest position + 1: HF's ``rope_deltas``), from the prompt itself, so nothing carries over between calls.

The vision-tower stage (layer -1) reads the tower per sample (:class:`QwenTower`): each block's input in the
processor's patch order (HF's Qwen2.5-VL runs its blocks in window order, ``window_index``; un-permuted here), and
each block's attention recomputed in fp32 with its own weights and 2-D rotary embedding, restricted to what the
block computes (its image; Qwen2.5-VL's window blocks: its window). Four consecutive patches are one merge unit,
vision token j = patches 4j .. 4j + 3, as the ``PatchMerger`` groups them.

Shapes: B batch, N tokens, P patches, D a patch's pixels (3 * temporal_patch_size * patch_size ** 2), Nv vision
slots per sample, C_v the tower's width, h_v its heads, d_v their width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import (
    PreTrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from lvpruning.adapters import DecoderAdapter
from lvpruning.layout import BASE, VisionLayout

if TYPE_CHECKING:
    from lvpruning.policies import PruningPolicy

QWEN_VL_FAMILIES = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
QWEN_VL_CONFIGS = (Qwen2VLConfig, Qwen2_5_VLConfig)


class QwenVLAdapter(DecoderAdapter):
    """Qwen2-VL and Qwen2.5-VL, images only (one per sample); ``image_sizes`` is the processor's
    ``image_grid_thw`` (B, 3). The decoder side (layers, ``rotary_emb`` on 3-D positions, the attention module's
    own ``apply_rotary_pos_emb`` in the recomputed attention rows) is :class:`DecoderAdapter`'s."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.merge = model.config.vision_config.spatial_merge_size

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        tower_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, QwenTower | None]:
        """Token embeddings with HF's vision tower + merger output scattered in (``get_image_features`` ->
        ``get_placeholder_mask`` -> ``masked_scatter``). Returns embeddings (B, N, C), the vision mask (B, N), each
        sample's number of vision tokens (B,) from its grid, no DeepStack features (Qwen3-VL's only), and with
        ``tower_states`` the tower's view for the vision-tower stage (:class:`QwenTower`), ``None`` otherwise."""
        if image_sizes is None:
            raise ValueError(f"{type(self.model).__name__} needs image_grid_thw beside pixel_values")
        inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, N, C)
        captured: list[torch.Tensor] = []  # each block's input, then the merger's, (sum P_b, C_v) in window order
        hooks = []
        if tower_states:
            for module in (*self.vision_blocks, self.model.model.visual.merger):
                hooks.append(module.register_forward_pre_hook(lambda _, args: captured.append(args[0])))
        try:
            image = self.model.model.get_image_features(pixel_values, image_sizes, return_dict=True)
        finally:
            for hook in hooks:
                hook.remove()
        features = torch.cat(image.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder, _ = self.model.model.get_placeholder_mask(input_ids, inputs_embeds, image_features=features)
        inputs_embeds = inputs_embeds.masked_scatter(placeholder, features)
        vision_mask = input_ids == self.model.config.image_token_id  # (B, N)
        tower = QwenTower(self, self.per_sample(captured, image_sizes), image_sizes.cpu()) if tower_states else None
        return inputs_embeds, vision_mask, self.vision_counts(image_sizes), None, tower

    def vision_counts(self, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Each image's vision tokens after the merger, t * h * w / merge^2, (B,) on the CPU."""
        return image_grid_thw.cpu().prod(-1) // self.merge**2

    def sample_pixels(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """The flattened patches (sum P_b, D) as one row per sample, (B, max P_b, D), zero beyond a sample's own
        (what ``StageInput.pixel_values`` holds, so a policy reads a sample's image alone as in a batch)."""
        patches = image_sizes.cpu().prod(-1).tolist()
        out = pixel_values.new_zeros(len(patches), max(patches), pixel_values.shape[-1])  # (B, P, D)
        for b, chunk in enumerate(pixel_values.split(patches)):
            out[b, : chunk.shape[0]] = chunk
        return out

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_sizes: torch.Tensor
    ) -> torch.Tensor:
        """The prompt's M-RoPE positions (3, B, N) from HF's own ``get_rope_index``, padding-aware (padding and a
        sample's empty vision slots are skipped, so each sample's positions are those it has alone)."""
        mm_token_type_ids = (input_ids == self.model.config.image_token_id).int()  # images: 1, text: 0
        positions, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_sizes, attention_mask=attention_mask
        )
        return positions

    def last_position(self, position_ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """The prompt's largest position over its real tokens and the three axes, (3, B, 1): HF's decoding
        positions are ``text position + rope_deltas`` = this + 1, + 2, ... (``rope_deltas = max + 1 - length``)."""
        largest = position_ids.masked_fill(~padding[None], 0).amax(dim=(0, 2))  # (B,)
        return largest[None, :, None].expand(3, -1, 1)

    def layer_position_ids(self, position_ids: torch.Tensor) -> None:
        """None, as HF's Qwen-VL text model gives its layers for unpacked sequences (RoPE carries the positions)."""
        return None

    def layout(self, num_samples: int, image_sizes: torch.Tensor, num_slots: int) -> VisionLayout:
        """Each vision token's cell in its image's merged grid (h / 2 x w / 2, raster order, as the merger and
        ``get_rope_index`` order them): kind ``BASE`` (Qwen-VL has one view, at its own resolution), tile -1 (as
        LLaVA-1.5's only view), row and column in that grid."""
        rows = []
        for t, h, w in image_sizes.cpu().tolist():
            cell = torch.arange(t * (h // self.merge) * (w // self.merge))
            width = w // self.merge
            row, col = (cell // width) % (h // self.merge), cell % width
            rows.append(torch.stack([torch.full_like(cell, BASE), torch.full_like(cell, -1), row, col], dim=1))
        return VisionLayout.stack(rows, num_slots)

    def check_tower_stage(self, policy: PruningPolicy) -> None:
        """Fail before any model work where ``policy``'s vision-tower stage (layer -1) cannot run on Qwen-VL's
        tower: only a policy that reads nothing of it (``tower_free``) or reads it by merged token
        (``tower_merged``: VisionZip, VScan)."""
        if policy.tower_free or policy.tower_merged:
            return
        raise ValueError(
            f"{policy.name}'s vision-tower stage (layer -1) runs on the LLaVA families only; it is not ported to "
            f"{type(self.model).__name__}'s vision tower (no CLS token, 2 x 2 merged tokens): prune after a decoder "
            "layer (layers >= 0)"
        )

    # ------------------------------------------------------------------ the vision-tower stage

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.model.model.visual.blocks

    @property
    def merge_unit(self) -> int:
        """Patches per vision token: the merger's 2 x 2."""
        return self.merge**2

    def full_attention(self, block: int) -> bool:
        """Whether tower block ``block`` attends over the whole image (Qwen2-VL: every block; Qwen2.5-VL: those in
        ``fullatt_block_indexes``), not within windows."""
        vision = self.model.config.vision_config
        return not isinstance(self.model, Qwen2_5_VLForConditionalGeneration) or block in vision.fullatt_block_indexes

    def window_order(self, grid: torch.Tensor) -> torch.Tensor:
        """The patch order (P,) HF runs the blocks in for the images ``grid`` (n, 3): the blocks' row r is patch
        ``order[r]`` in the processor's order (Qwen2.5-VL: merge units in window order; Qwen2-VL: as given)."""
        patches = int(grid.prod(-1).sum())
        if not isinstance(self.model, Qwen2_5_VLForConditionalGeneration):
            return torch.arange(patches)
        v = self.model.config.vision_config
        units, _ = get_vision_window_index(grid, self.merge, v.window_size, v.patch_size)  # (P / 4,)
        return (units[:, None] * self.merge_unit + torch.arange(self.merge_unit)).flatten()  # (P,)

    def windows(self, grid: torch.Tensor) -> torch.Tensor:
        """Each patch's attention window (P,) in one image of ``grid`` (1, 3), processor order (Qwen2.5-VL's
        ``cu_window_seqlens``; Qwen2-VL: one window)."""
        patches = int(grid.prod())
        if not isinstance(self.model, Qwen2_5_VLForConditionalGeneration):
            return torch.zeros(patches, dtype=torch.long)
        v = self.model.config.vision_config
        _, bounds = get_vision_window_index(grid, self.merge, v.window_size, v.patch_size)
        in_order = torch.bucketize(torch.arange(patches), bounds[1:].long(), right=True)  # (P,) window order
        return torch.empty_like(in_order).scatter_(0, self.window_order(grid), in_order)

    def per_sample(self, captured: list[torch.Tensor], grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states captured in window order over the batch's images, each (sum P_b, C_v), as (B, P, C_v)
        per sample in the processor's order (P = max P_b, zero beyond a sample's own)."""
        grid = grid.cpu()
        order = self.window_order(grid).to(captured[0].device)
        patches = grid.prod(-1).tolist()
        out = []
        for hidden in captured:
            raster = torch.empty_like(hidden).index_copy_(0, order, hidden)  # (sum P_b, C_v) processor order
            padded = hidden.new_zeros(len(patches), max(patches), hidden.shape[-1])  # (B, P, C_v)
            for b, chunk in enumerate(raster.split(patches)):
                padded[b, : chunk.shape[0]] = chunk
            out.append(padded)
        return tuple(out)

    def vision_rotary(self, grid: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's 2-D rotary (cos, sin), each (P_b, d_v), of one image of ``grid`` (1, 3), processor order."""
        positions = get_vision_position_ids(grid, self.merge).to(like.device)  # (P_b, 2): row, column
        return self.model.model.visual.rotary_pos_emb(like, positions)

    def vision_feature_layer(self) -> int:
        """The block whose output the merger reads: the last (``vision_states[depth]`` is its output)."""
        return len(self.vision_blocks) - 1

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The ``PatchMerger`` on merged tokens' features (B, n, 4 C_v) (its input, 4 patches side by side) ->
        (B, n, C)."""
        B, n, _ = features.shape
        merger = self.model.model.visual.merger
        return merger(features.reshape(B * n * self.merge_unit, -1)).view(B, n, -1)

    def vision_tower(self, states: QwenTower | None, layout: VisionLayout) -> QwenTower | None:
        """The vision-tower stage's view of the tower: ``embed``'s already."""
        return states


@dataclass
class QwenTower:
    """The vision-tower stage's view of Qwen-VL's tower, one row per sample: ``states[l]`` (B, P, C_v) the input of
    block ``l`` (``states[depth]`` the last block's output, the merger's input) in the processor's patch order,
    zero beyond a sample's own P_b, and each block's keys computed once."""

    adapter: QwenVLAdapter
    states: tuple[torch.Tensor, ...]
    grid: torch.Tensor  # (B, 3) image_grid_thw, on the CPU
    keys_by_layer: dict[int, torch.Tensor] = field(default_factory=dict)
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's (cos, sin) per sample, (B, P, d_v) each, zero beyond a sample's patches."""
        if self.cos_sin is None:
            like = self.states[0]
            B, P = like.shape[:2]
            cos, sin = like.new_zeros((2, B, P, self.adapter.vision_blocks[0].attn.head_dim), dtype=torch.float32)
            for b in range(B):
                c, s = self.adapter.vision_rotary(self.grid[b : b + 1], like)
                cos[b, : c.shape[0]], sin[b, : s.shape[0]] = c, s
            self.cos_sin = cos, sin
        return self.cos_sin

    def valid(self) -> torch.Tensor:
        """(B, P) True on a sample's own patches."""
        P = self.states[0].shape[1]
        return torch.arange(P)[None, :] < self.grid.prod(-1)[:, None]

    def qk(self, layer: int, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer``'s rotated queries at the patches ``rows`` (B, Q) (all when ``None``) and keys, fp32:
        (B, h_v, Q, d_v), (B, h_v, P, d_v)."""
        attn = self.adapter.vision_blocks[layer].attn
        h = self.adapter.vision_blocks[layer].norm1(self.states[layer])  # (B, P, C_v)
        weight, bias = attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3)  # q, k, v: (C_v, C_v), (C_v,)
        cos, sin = self.rotary()
        if rows is not None:
            h, cos, sin = (gather_rows(x, rows) for x in (h, cos, sin))
        q = nn.functional.linear(h, weight[0], bias[0]).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
        q = rotate(q.float(), cos, sin)  # (B, h_v, Q, d_v)
        return q, self.keys(layer)

    def keys(self, layer: int) -> torch.Tensor:
        """Block ``layer``'s rotated keys (B, h_v, P, d_v), fp32."""
        if layer not in self.keys_by_layer:
            attn = self.adapter.vision_blocks[layer].attn
            h = self.adapter.vision_blocks[layer].norm1(self.states[layer])  # (B, P, C_v)
            weight, bias = attn.qkv.weight.chunk(3)[1], attn.qkv.bias.chunk(3)[1]
            k = nn.functional.linear(h, weight, bias).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
            self.keys_by_layer[layer] = rotate(k.float(), *self.rotary())  # (B, h_v, P, d_v)
        return self.keys_by_layer[layer]

    def attention(self, layer: int, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``layer``'s softmax attention (B, h_v, Q, P) of the patches ``queries`` (B, Q) (all P when
        ``None``), fp32, over the keys the block attends to: its own image's, and on Qwen2.5-VL's window blocks
        its own window's; 0 on every other key, and a row of 0 for a query beyond the sample's patches."""
        attn = self.adapter.vision_blocks[layer].attn
        q, k = self.qk(layer, queries)
        scores = (q @ k.transpose(2, 3)) * attn.scaling  # (B, h_v, Q, P)
        valid = self.valid().to(scores.device)  # (B, P)
        query_valid = valid if queries is None else valid.gather(1, queries)  # (B, Q)
        allowed = query_valid[:, :, None] & valid[:, None, :]  # (B, Q, P)
        if not self.adapter.full_attention(layer):
            window = torch.full(valid.shape, -1, dtype=torch.long)  # (B, P), -1 beyond a sample's patches
            for b in range(window.shape[0]):
                own = self.adapter.windows(self.grid[b : b + 1])
                window[b, : own.shape[0]] = own
            window = window.to(scores.device)
            query_window = window if queries is None else window.gather(1, queries)  # (B, Q)
            allowed = allowed & (query_window[:, :, None] == window[:, None, :])
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return torch.nan_to_num(scores.softmax(dim=-1))

    def stage_fields(self) -> dict[str, Any]:
        """The ``StageInput`` fields of the vision-tower stage."""
        return {
            "vision_states": self.states,
            "vision_attention": self.attention,
            "vision_keys": self.keys,
            "project": self.adapter.project,
            "feature_layer": self.adapter.vision_feature_layer(),
            "merge_unit": self.adapter.merge_unit,
        }


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, P, ...) at ``rows`` (B, Q) -> (B, Q, ...)."""
    return x.gather(1, rows.view(*rows.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tower's rotary on x (B, h_v, n, d_v) with cos, sin (B, n, d_v) (HF's ``apply_rotary_pos_emb_vision``,
    in fp32)."""
    cos, sin = cos[:, None].float(), sin[:, None].float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def mean_received_attention(attention: torch.Tensor, valid: torch.Tensor, merge_unit: int) -> torch.Tensor:
    """The CLS attention's substitute on a tower without a CLS token, per vision token: the attention each patch
    receives, averaged over the heads and over the query patches of its own image, then over the ``merge_unit``
    patches that make the vision token. ``attention`` (B, h_v, P, P) queries x keys, ``valid`` (B, P) the sample's
    own patches -> (B, P / merge_unit)."""
    received = attention.mean(dim=1).sum(dim=1)  # (B, P): over the heads, summed over the queries
    received = received / valid.sum(dim=1, keepdim=True).clamp_min(1)  # mean over the image's own queries
    return received.unflatten(1, (-1, merge_unit)).mean(dim=-1)  # (B, Nv)


def tower_width(config: PreTrainedConfig) -> int:
    """C_v, the tower's width: Qwen2-VL's ``embed_dim`` (its ``hidden_size`` is the decoder's), Qwen2.5-VL's
    ``hidden_size``."""
    v = config.vision_config
    return v.embed_dim if isinstance(config, Qwen2VLConfig) else v.hidden_size


def tower_rows_flops(config: PreTrainedConfig, num_patches: int, keys: bool = True) -> int:
    """Matmul FLOPs of :meth:`QwenTower.attention` on one image of ``num_patches`` patches, every query: the query
    projection and Q K^T over all heads (the whole image even for a window block: the mask comes after), and with
    ``keys`` the key projection (computed once per block)."""
    d = tower_width(config)
    return 2 * num_patches * d * d * (1 + keys) + 2 * num_patches * num_patches * d


def merger_flops(config: PreTrainedConfig, num_tokens: int) -> int:
    """Matmul FLOPs of the ``PatchMerger`` (Linear(4 C_v, 4 C_v), GELU, Linear(4 C_v, C)) on ``num_tokens``."""
    wide = tower_width(config) * config.vision_config.spatial_merge_size**2
    return 2 * num_tokens * wide * wide + 2 * num_tokens * wide * config.text_config.hidden_size
