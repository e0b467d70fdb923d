"""The Qwen-VL adapter: ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

An image is ``<|vision_start|>``, n x ``<|image_pad|>``, ``<|vision_end|>`` in the prompt, with n = t * h * w / 4
after the 2 x 2 ``PatchMerger``: images of different sizes give samples different numbers of vision tokens, which
the engine's per-sample counts and ``equalize_vision`` handle as for LLaVA-NeXT. ``pixel_values`` are the
processor's flattened patches (sum_b t_b * h_b * w_b, D), ``image_grid_thw`` (B, 3) each image's patch grid.

Positions are 3-D (M-RoPE): HF's own ``get_rope_index`` computes them once for the prompt, padding-aware; every kept
token keeps its (t, h, w) position (eq. 14), and decoding continues where HF's ``generate`` does (the prompt's
largest position + 1: HF's ``rope_deltas``), from the prompt itself, so nothing carries over between calls.

Shapes: B batch, N tokens, P patches, D a patch's pixels (3 * temporal_patch_size * patch_size ** 2), Nv vision
slots per sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from lvpruning.adapters import DecoderAdapter
from lvpruning.layout import BASE, VisionLayout

if TYPE_CHECKING:
    from lvpruning.policies import PruningPolicy

QWEN_VL_FAMILIES = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)


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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        """Token embeddings with HF's vision tower + merger output scattered in (``get_image_features`` ->
        ``get_placeholder_mask`` -> ``masked_scatter``). Returns embeddings (B, N, C), the vision mask (B, N), each
        sample's number of vision tokens (B,) from its grid, no DeepStack features (Qwen3-VL's only) and no tower
        states (the vision-tower stage is not ported to Qwen-VL)."""
        if image_sizes is None:
            raise ValueError(f"{type(self.model).__name__} needs image_grid_thw beside pixel_values")
        inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, N, C)
        image = self.model.model.get_image_features(pixel_values, image_sizes, return_dict=True)
        features = torch.cat(image.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder, _ = self.model.model.get_placeholder_mask(input_ids, inputs_embeds, image_features=features)
        inputs_embeds = inputs_embeds.masked_scatter(placeholder, features)
        vision_mask = input_ids == self.model.config.image_token_id  # (B, N)
        return inputs_embeds, vision_mask, self.vision_counts(image_sizes), None, None

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
        """Fail before any model work where ``policy``'s vision-tower stage (layer -1) reads the tower: not ported
        to Qwen-VL's (a policy that reads nothing of it, ``tower_free``, prunes the embeddings before layer 0)."""
        if policy.tower_free:
            return
        raise ValueError(
            f"{policy.name}'s vision-tower stage (layer -1) runs on the LLaVA families only; it is not ported to "
            f"{type(self.model).__name__}'s vision tower: prune after a decoder layer (layers >= 0)"
        )
