"""The Qwen3-VL adapter: ``Qwen3VLForConditionalGeneration`` (Qwen2.5-VL's prompt format, processor outputs and 3-D
positions, with three differences the engine follows).

- DeepStack: the vision tower also merges the outputs of its blocks ``deepstack_visual_indexes`` (each through its
  own merger) into L more features per vision token, and HF's text model adds feature ``i`` to the hidden states
  of the vision tokens after decoder layer ``i`` (``_deepstack_process``), i < L. Each vision token carries its
  own (``TokenSequence.deepstack``): a kept token keeps them, a removed token takes them with it, and in training
  mode they are added at every vision position, as HF does (a masked token is masked in attention anyway).
- Interleaved M-RoPE: the positions are HF's own ``get_rope_index`` and the angles the decoder's own
  ``rotary_emb`` (:class:`~lvpruning.qwen_vl.QwenVLAdapter`'s, unchanged); decoding continues at the prompt's
  largest position + 1, as HF's ``rope_deltas`` do.
- q/k norms: the decoder's attention normalizes each head's queries and keys (an RMSNorm before RoPE), which
  :meth:`~lvpruning.adapters.DecoderAdapter.attention_rows` applies as the module does.

The vision tower attends over each whole image (no windows, unlike Qwen2.5-VL's).

Shapes: B batch, N tokens, L DeepStack layers, C hidden size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lvpruning.qwen_vl import QwenVLAdapter

if TYPE_CHECKING:
    from lvpruning.policies import PruningPolicy


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL, images only (one per sample); ``image_sizes`` is the processor's ``image_grid_thw`` (B, 3)."""

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        tower_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        """Token embeddings with HF's vision tower + merger output scattered in (``get_image_features`` ->
        ``get_placeholder_mask`` -> ``masked_scatter``, as ``Qwen3VLModel.forward``). Returns embeddings (B, N, C),
        the vision mask (B, N), each sample's number of vision tokens (B,), the DeepStack features (L, sum n_b, C)
        of the vision tokens in the order of the vision mask (HF's ``deepstack_visual_embeds``, stacked), and no
        tower states."""
        if image_sizes is None:
            raise ValueError(f"{type(self.model).__name__} needs image_grid_thw beside pixel_values")
        inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, N, C)
        image = self.model.model.get_image_features(pixel_values, image_sizes, return_dict=True)
        features = torch.cat(image.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder, _ = self.model.model.get_placeholder_mask(input_ids, inputs_embeds, image_features=features)
        inputs_embeds = inputs_embeds.masked_scatter(placeholder, features)
        vision_mask = input_ids == self.model.config.image_token_id  # (B, N)
        deepstack = torch.stack([torch.cat(per_image, dim=0) for per_image in image.deepstack_features])
        return inputs_embeds, vision_mask, self.vision_counts(image_sizes), deepstack.to(inputs_embeds.device), None

    def check_tower_stage(self, policy: PruningPolicy) -> None:
        """Fail before any model work where ``policy``'s vision-tower stage (layer -1) reads the tower: not ported
        to Qwen3-VL's (a ``tower_free`` policy prunes the embeddings, with their DeepStack features, before layer
        0)."""
        if policy.tower_free:
            return
        raise ValueError(
            f"{policy.name}'s vision-tower stage (layer -1) is not ported to {type(self.model).__name__}'s vision "
            "tower (DeepStack): prune after a decoder layer (layers >= 0)"
        )
