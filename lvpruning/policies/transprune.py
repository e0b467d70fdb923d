"""TransPrune: token transition variation plus instruction-guided attention."""

from __future__ import annotations

import torch

from lvpruning.adapters import attention_rows_flops
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.stage import LayerRecord, StageInput, StageShape


def rowwise_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``<x_n, y_n>`` for every token, (B, N, C) x (B, N, C) -> (B, N) in fp32, as a batched matmul (counted)."""
    return (x.float().unsqueeze(-2) @ y.float().unsqueeze(-1))[..., 0, 0]


def masked_softmax(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of ``values`` (B, N) among the ``valid`` (B, N) entries; 0 elsewhere."""
    return values.masked_fill(~valid, float("-inf")).softmax(dim=1).nan_to_num()


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """``scores / sum(scores)`` over dim 1 (B, V)."""
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


class TransPrunePolicy(PruningPolicy):
    """TransPrune (Li et al., 2025; liaolea/TransPrune, ``llava/model/modeling_llama_transprune.py``).

    Token Transition Variation, for each sub-block (attention, FFN) of a recorded layer, with ``x_n`` the normed
    input of token n and ``y_n`` the sub-block's output (before the residual add)::

        TTV_n = sum_{block} ||y_n|| / ||x_n|| * softmax_n(1 - cos(x_n, y_n))

    the softmax taken over the prompt's tokens the layer sees (image and instruction), accumulated from the first
    pruning layer up to the stage. Instruction-Guided Attention: the attention that the instruction tokens after
    the image pay each image token in the layer the stage prunes before (``StageInput.next_attention``), averaged
    over heads and those tokens. The keep score is ``TTV / sum TTV + IGA / sum IGA`` over the kept image tokens.

    Published (LLaVA-1.5-7B, the repository's scripts): ``pruning_layer_list = [7, 9, 12]``, pruning before those
    (zero-based) layers, i.e. after layers 6, 8, 11, keeping 0.875, 0.625, 0.125 of the image tokens (504, 360, 72
    of 576), TTV over layers 6-11. Where we differ: the reference's softmax normaliser sums over the whole batch's
    sequence (it runs with batch size 1); here over each sample's prompt, so a sample scores the same in any batch
    and generated tokens do not count. As for every method here, the kept tokens keep their original positions (the
    reference renumbers them).
    """

    name = "transprune"
    published = Schedule(layers=(6, 8, 11), ratios=(0.875, 0.625, 0.125))

    def recorded_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(range(layers[0], layers[-1] + 1))

    def observe(self, record: LayerRecord) -> torch.Tensor:
        valid = (record.vision | record.instruction) & record.padding  # the prompt: image and instruction
        ttv = 0.0
        for x, y in ((record.attn_in, record.attn_out), (record.mlp_in, record.mlp_out)):
            xx, yy, xy = rowwise_dot(x, x), rowwise_dot(y, y), rowwise_dot(x, y)
            cosine = xy / (xx * yy).sqrt().clamp_min(1e-12)
            ttv = ttv + (yy / xx.clamp_min(1e-12)).sqrt() * masked_softmax(1.0 - cosine, valid)
        return ttv  # (B, N)

    def scores(self, stage: StageInput) -> torch.Tensor:
        ttv = sum(stage.recorded(layer) for layer in stage.records if layer <= stage.layer)  # (B, V)
        ttv = ttv * stage.vision_valid()  # normalised over the sample's tokens in play only
        queries = stage.after_image()  # (B, T) the instruction after the image
        rows = stage.next_attention(stage.text_pos).mean(dim=1)  # (B, T, N), mean over heads
        to_vision = rows.gather(2, stage.vision_pos[:, None, :].expand(-1, rows.shape[1], -1))  # (B, T, V)
        iga = (to_vision * queries[..., None]).sum(1) / queries.sum(1, keepdim=True).clamp_min(1)  # (B, V)
        return normalized(ttv) + normalized(iga)

    def overhead_flops(self, text_config, stage: StageShape) -> int:
        return attention_rows_flops(text_config, stage.num_text, stage.num_tokens)

    def record_flops(self, text_config, layer: StageShape) -> int:
        return 2 * 3 * 2 * layer.num_tokens * text_config.hidden_size  # 3 dot products per token per sub-block
