"""VisionZip: dominant tokens by the CLS attention, the rest merged into a few contextual tokens."""

from __future__ import annotations

import torch
from transformers import LlavaConfig

from lvpruning.adapters import projector_flops, vision_attention_rows_flops
from lvpruning.merging import group_sum, group_sum_flops, nearest, nearest_flops
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.policies.tiles import merged_counts, pass_budgets, per_sample_plan, tower_passes
from lvpruning.qwen_vl import QWEN_VL_CONFIGS, mean_received_attention, merger_flops, tower_rows_flops, tower_width
from lvpruning.stage import MergePlan, StageInput, StageShape, gather_tokens

CONTEXTUAL_SHARE = 10 / 64  # published 54 + 10, 108 + 20, 162 + 30


def contextual_count(k: int) -> int:
    """Contextual tokens in a budget of ``k``: 10 of 64 (20 of 128, 30 of 192), at most ``k - 1``."""
    return min(k - 1, round(k * CONTEXTUAL_SHARE))


def contextual_targets(num_rest: int, num_contextual: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual targets among the ``num_rest`` remaining tokens (every ``max(1, Nf // K)``-th, the
    first K), and the others that merge into them: two index tensors, (K,) and (Nf - K,)."""
    targets = torch.arange(0, num_rest, max(1, num_rest // num_contextual))[:num_contextual]
    others = torch.ones(num_rest, dtype=torch.bool)
    others[targets] = False
    return targets.to(device), others.nonzero()[:, 0].to(device)


class VisionZipPolicy(PruningPolicy):
    """VisionZip (Yang et al., CVPR 2025, "Longer is Better but Not Necessary"; dvlab-research/VisionZip,
    ``visionzip/clip_encoder.py``, ``visionzip/utils.py``). One stage at the vision tower, on the encoder layer
    whose output LLaVA projects (22 of 24), with A its attention and H its output (CLS included):

        s_j = sum_h A_h[CLS, j]                       dominant: CLS + the top D - 1 patches by s
        keys  kbar_j = mean_h K_h[j] / ||.||           of that layer, for similarity
        Nf = 577 - D remaining patches in raster order; targets t_c = c * max(1, Nf // K), c < K
        each other remaining token i joins c(i) = argmax_c <kbar_i, kbar_{t_c}>
        contextual_c = H[t_c] + mean_{i: c(i) = c} H[i]

    and the D + K tokens go through the projector (the dominant patches' projections are the embeddings already).
    The CLS token, which LLaVA drops, is fed to the LLM. Published (LLaVA-1.5-7B): 64 / 128 / 192 tokens =
    54 + 10, 108 + 20, 162 + 30 (D counts the CLS token). Slots: here every token keeps an original position
    (eq. 14; the reference renumbers): a dominant patch its own, a contextual token its target's, the CLS token the
    image's first free slot (VisionZip places it first).

    LLaVA-NeXT (``visionzip/llava_arch.py``, ``restore_image_features_sorted``; the authors: "we simply apply
    VisionZip to each part directly, similar to LLaVA-1.5", 640 / 320 / 160 tokens = 5 passes x 128 / 64 / 32 on a
    2 x 2 grid): the rule above runs on every tower pass apart (the base view, then each tile), each keeping its
    share of the sample's k_b (:func:`~lvpruning.policies.tiles.pass_budgets`: equal shares, the base view first
    for the remainder) as D + K of that share (K = 10/64 of it), its own CLS token and contextual tokens included.
    The reference drops every newline token (its restore replaces the unpadding and adds none): here they are
    never kept, unless k_b exceeds the sample's patches (then the first ones fill it, unchanged). Where we differ:
    the reference keeps a fixed D + K per pass whatever the grid (so 3 x 128 on a 1 x 2 grid) and skips HF's
    unpadding, so it may keep, and merge, patches of a tile's letterbox rows; here each sample keeps its own
    k_b of its own count, and only the patches that reach the decoder (those HF's unpadding keeps) are ranked
    and merged. Slots as on LLaVA-1.5, per pass: a pass's CLS token takes that pass's first free slot.

    Qwen2-VL / Qwen2.5-VL (no CLS token; a vision token is the ``PatchMerger``'s 2 x 2 patches), our reading, as
    the public Qwen ports rank: the rule above on each sample's merged tokens, at the last block (its output feeds
    the merger; a full-attention block in Qwen2.5-VL), with s_j the mean attention received
    (:func:`~lvpruning.qwen_vl.mean_received_attention`: over the heads and the image's query patches, then over
    the 4 patches of token j) in place of the CLS attention, D = k - K dominant tokens (no CLS token to add), a
    token's key the mean of its 4 patches' head-mean keys (rotated, as the block's attention uses them), its
    features H the merger's input (the 4 patches side by side, 4 C_v), and the contextual tokens through the
    whole merger (``project``).
    """

    name = "visionzip"
    published = Schedule(layers=(-1,), ratios=(64 / 576,))
    tower_stage = True
    tower_tiles = True
    tower_cls = True
    tower_merged = True
    per_sample_budgets = True

    def check_layers(self, layers: tuple[int, ...]) -> None:
        if tuple(layers) != (-1,):
            raise ValueError(f"visionzip prunes at the vision tower only: layers [-1], not {list(layers)}")

    def plan(self, stage: StageInput, k: int) -> MergePlan:
        if stage.merge_unit:
            return self._plan_merged(stage)
        if stage.vision_states[0].dim() == 4:
            return self._plan_tiles(stage)
        B, P = stage.vision_pos.shape
        if k >= P:
            return MergePlan(torch.arange(P, device=stage.vision_pos.device).expand(B, P))
        num_contextual = contextual_count(k)
        num_dominant = k - num_contextual - 1  # patches; the CLS token is the last dominant one
        layer = stage.feature_layer
        features = stage.vision_states[layer + 1]  # (B, M, C_v): LLaVA's features, CLS first
        cls_query = torch.zeros(B, 1, dtype=torch.long, device=features.device)
        s = stage.vision_attention(layer, cls_query).sum(dim=1)[:, 0, 1:]  # (B, P), summed over heads
        dominant = s.topk(num_dominant, dim=1).indices  # (B, D - 1) patches
        is_dominant = torch.zeros_like(s, dtype=torch.bool).scatter(1, dominant, True)
        remaining = torch.argsort(is_dominant.to(torch.int8), dim=1, stable=True)[:, : P - num_dominant]  # (B, Nf)
        slots = [dominant]
        hidden = [gather_tokens(stage.hidden_out, stage.vision_pos.gather(1, dominant))]
        news = [features[:, :1]]  # the CLS token
        if num_contextual:
            num_rest = remaining.shape[1]
            targets, others = contextual_targets(num_rest, num_contextual, features.device)
            keys = stage.vision_keys(layer).mean(dim=1)[:, 1:]  # (B, P, d): the head-mean keys of the patches
            rest_keys, rest = gather_tokens(keys, remaining), gather_tokens(features[:, 1:], remaining)
            join = nearest(rest_keys[:, others], rest_keys[:, targets])  # (B, Nf - K)
            sums, counts = group_sum(rest[:, others], join, num_contextual)
            news.append(rest[:, targets] + (sums / counts.clamp_min(1)[..., None]).to(rest.dtype))
            slots.append(remaining[:, targets])
        taken = is_dominant.scatter(1, slots[-1], True)
        slots.append(torch.argmax((~taken).to(torch.int8), dim=1, keepdim=True))  # the CLS token's slot
        projected = stage.project(torch.cat(news[1:] + news[:1], dim=1))  # contextual..., CLS
        return MergePlan(torch.cat(slots, dim=1), torch.cat([*hidden, projected.to(stage.hidden_out.dtype)], 1))

    def _plan_tiles(self, stage: StageInput) -> MergePlan:
        """LLaVA-NeXT: the LLaVA-1.5 rule on each tower pass, within its share of the sample's k_b."""
        layer, device = stage.feature_layer, stage.hidden_out.device
        features = stage.vision_states[layer + 1]  # (B, P, M, C_v)
        B, P = features.shape[:2]
        cls_query = torch.zeros(B, P, 1, dtype=torch.long, device=device)
        s = stage.vision_attention(layer, cls_query).sum(dim=2)[:, :, 0]  # (B, P, M), summed over heads
        keys = stage.vision_keys(layer).mean(dim=2)  # (B, P, M, d): head-mean keys
        passes, newlines = tower_passes(stage)
        keep, hidden = [], []
        for b, (mine, k_b) in enumerate(zip(passes, stage.keep_counts)):
            budgets = pass_budgets(k_b, [tp.slots.shape[0] for tp in mine])
            slots, states = [], []
            for tp, k_p in zip(mine, budgets):
                if k_p == 0:
                    continue
                tokens, own = tp.tokens.to(device), tp.slots.to(device)
                if k_p >= own.shape[0]:  # the whole pass
                    slots.append(own)
                    states.append(stage.hidden_out[b, stage.vision_pos[b, own]])
                    continue
                pass_slots, new = self._zip_pass(
                    s[b, tp.index, tokens], keys[b, tp.index, tokens], features[b, tp.index], tokens, k_p
                )
                slots.append(own[pass_slots])
                dominant = pass_slots[: pass_slots.shape[0] - new.shape[0]]
                projected = stage.project(new[None])[0].to(stage.hidden_out.dtype)  # (K + 1, C)
                states.append(torch.cat([stage.hidden_out[b, stage.vision_pos[b, own[dominant]]], projected]))
            spare = k_b - sum(budgets)  # only when k_b exceeds the sample's patches: newlines fill it
            lines = newlines[b][:spare].to(device)
            keep.append(torch.cat([*slots, lines]))
            hidden.append(torch.cat([*states, stage.hidden_out[b, stage.vision_pos[b, lines]]]))
        return per_sample_plan(stage, keep, hidden)

    def _plan_merged(self, stage: StageInput) -> MergePlan:
        """Qwen-VL: the rule on each sample's merged tokens, ranked by the mean attention received."""
        layer, unit, device = stage.feature_layer, stage.merge_unit, stage.hidden_out.device
        counts = merged_counts(stage)
        if all(k >= n for n, k in zip(counts, stage.keep_counts)):  # every sample keeps all its tokens
            return MergePlan(torch.arange(max(counts), device=device).expand(len(counts), -1))
        patches = torch.arange(stage.vision_states[0].shape[1])[None, :] < torch.tensor(counts)[:, None] * unit
        s = mean_received_attention(stage.vision_attention(layer, None), patches.to(device), unit)  # (B, Nv)
        keys = stage.vision_keys(layer).mean(dim=1).unflatten(1, (-1, unit)).mean(dim=2)  # (B, Nv, d_v)
        features = stage.vision_states[layer + 1].unflatten(1, (-1, unit)).flatten(2)  # (B, Nv, 4 C_v)
        keep, hidden = [], []
        for b, (n, k) in enumerate(zip(counts, stage.keep_counts)):
            own = stage.hidden_out[b, stage.vision_pos[b, :n]]  # (n, C) the merger's output
            if k >= n:
                keep.append(torch.arange(n, device=device))
                hidden.append(own)
                continue
            num_contextual = contextual_count(k)
            dominant = s[b, :n].topk(k - num_contextual).indices  # (D,)
            is_dominant = torch.zeros(n, dtype=torch.bool, device=device).scatter(0, dominant, True)
            remaining = torch.argsort(is_dominant.to(torch.int8), stable=True)[: n - dominant.shape[0]]  # (Nf,)
            slots, states = [dominant], [own[dominant]]
            if num_contextual:
                targets, others = contextual_targets(remaining.shape[0], num_contextual, device)
                rest_keys, rest = keys[b, remaining], features[b, remaining]  # (Nf, d_v), (Nf, 4 C_v)
                join = nearest(rest_keys[None, others], rest_keys[None, targets])  # (1, Nf - K)
                sums, merged = group_sum(rest[None, others], join, num_contextual)
                new = rest[targets] + (sums[0] / merged[0].clamp_min(1)[:, None]).to(rest.dtype)  # (K, 4 C_v)
                slots.append(remaining[targets])
                states.append(stage.project(new[None])[0].to(own.dtype))
            keep.append(torch.cat(slots))
            hidden.append(torch.cat(states))
        return per_sample_plan(stage, keep, hidden)

    @staticmethod
    def _zip_pass(
        s: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, tokens: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of n candidate patches (tower ``tokens`` (n,)), keeping ``k`` < n: CLS scores ``s`` (n,), keys
        (n, d), the pass's ``features`` (M, C_v). Returns the kept slots (k,) among the n (dominant, then each
        contextual token's target, then the CLS token's slot) and the new tokens' features (K + 1, C_v)
        (contextual..., CLS)."""
        n = s.shape[0]
        num_contextual = contextual_count(k)
        dominant = s.topk(k - num_contextual - 1).indices  # (D - 1,)
        is_dominant = torch.zeros(n, dtype=torch.bool, device=s.device).scatter(0, dominant, True)
        remaining = torch.argsort(is_dominant.to(torch.int8), stable=True)[: n - dominant.shape[0]]  # (Nf,) raster
        slots, news = [dominant], [features[:1]]  # the CLS token
        if num_contextual:
            num_rest = remaining.shape[0]
            targets, others = contextual_targets(num_rest, num_contextual, s.device)
            rest_keys, rest = keys[remaining], features[tokens[remaining]]  # (Nf, d), (Nf, C_v)
            join = nearest(rest_keys[None, others], rest_keys[None, targets])  # (1, Nf - K)
            sums, counts = group_sum(rest[None, others], join, num_contextual)
            news.append(rest[targets] + (sums[0] / counts[0].clamp_min(1)[:, None]).to(rest.dtype))
            slots.append(remaining[targets])
        taken = is_dominant.scatter(0, slots[-1], True)
        slots.append(torch.argmax((~taken).to(torch.int8), dim=0, keepdim=True))  # the CLS token's slot
        return torch.cat(slots), torch.cat(news[1:] + news[:1])

    def tower_flops(self, config: LlavaConfig, stage: StageShape) -> int:
        if isinstance(config, QWEN_VL_CONFIGS):
            return self._merged_flops(config, stage)
        if stage.tower_passes:
            return self._tiles_flops(config, stage)
        v = config.vision_config
        patches, k = stage.num_vision, stage.kept
        if k >= patches:
            return 0
        num_contextual = contextual_count(k)
        num_rest = patches - (k - num_contextual - 1)
        flops = vision_attention_rows_flops(v, 1, patches + 1)  # its keys serve the similarity too
        if num_contextual:
            others, head_dim = num_rest - num_contextual, v.hidden_size // v.num_attention_heads
            flops += nearest_flops(others, num_contextual, head_dim)
            flops += group_sum_flops(others, num_contextual, v.hidden_size)
        return flops + projector_flops(config, num_contextual + 1)

    @staticmethod
    def _merged_flops(config: LlavaConfig, stage: StageShape) -> int:
        """Qwen-VL: the last block's rows over the image's patches, the merge of the merged tokens, the merger on
        the contextual ones."""
        n, k = stage.num_vision, stage.kept
        if k >= n:
            return 0
        unit, width = config.vision_config.spatial_merge_size**2, tower_width(config)
        num_contextual = contextual_count(k)
        flops = tower_rows_flops(config, unit * n)
        if num_contextual:
            others = n - (k - num_contextual) - num_contextual
            head_dim = width // config.vision_config.num_heads
            flops += nearest_flops(others, num_contextual, head_dim)
            flops += group_sum_flops(others, num_contextual, unit * width) + merger_flops(config, num_contextual)
        return flops

    def _tiles_flops(self, config: LlavaConfig, stage: StageShape) -> int:
        """LLaVA-NeXT: the CLS rows on every pass, and each pass's merge within its share of k."""
        v = config.vision_config
        tokens = (v.image_size // v.patch_size) ** 2 + 1  # M, CLS included
        flops = len(stage.tower_passes) * vision_attention_rows_flops(v, 1, tokens)
        head_dim = v.hidden_size // v.num_attention_heads
        for n, k in zip(stage.tower_passes, pass_budgets(stage.kept, list(stage.tower_passes))):
            if k == 0 or k >= n:
                continue
            num_contextual = contextual_count(k)
            others = n - (k - num_contextual - 1) - num_contextual
            if num_contextual:
                flops += nearest_flops(others, num_contextual, head_dim)
                flops += group_sum_flops(others, num_contextual, v.hidden_size)
            flops += projector_flops(config, num_contextual + 1)
        return flops
