"""The LVPruning engine: decision modules attached to a frozen LLaVA, in training mode (masking, eqs. 5-12) and
inference mode (removal, eqs. 13-14), with KV-cached generation.

Shapes: B batch, N0 tokens of the prompt, N tokens in the current sequence, Nv vision slots per sample (576 for
LLaVA-1.5; for the tiled families the batch's largest count, ``lvpruning.layout``), V vision tokens still kept, T
text (non-vision) tokens, C hidden size, S stages.

Conventions:
- Keep ratios are fractions of each sample's own vision tokens n_b (eqs. 10-11). At inference stage ``s`` sample b
  keeps ``k_s = max(1, floor(rho_s * n_b))`` vision tokens (the paper's ``rho_s * |I_V|`` rounded down, as
  DynamicViT's ``int(N * ratio)``; a 1e-6 tolerance absorbs float error, so 0.3 * 10 keeps 3). Where samples keep
  different numbers, the batch keeps the largest and marks the rest of a sample's slots padding (re-padded).
- Position ids are the padding-aware original positions, as the adapter computes them (``cumsum(attention_mask) -
  1``, as HF ``generate`` does; Qwen-VL's 3-D M-RoPE positions (3, B, N) from its own ``get_rope_index``), and are
  kept for every surviving token (eq. 14); decoding continues from the prompt's (``adapter.last_position``).
- Qwen3-VL's DeepStack features travel with their vision tokens (``TokenSequence.deepstack``) and are added after
  decoder layers 0 .. L - 1, before a stage there: a removed token takes its own with it, a kept one keeps them.
- The instruction tokens (keys/values of the decision modules) are the non-vision, non-padding tokens, minus the
  supervised answer tokens when ``labels`` are given.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.utils import ModelOutput

from lvpruning.adapters import DecoderAdapter, boolean_causal_mask, get_adapter
from lvpruning.attention import ATTN_IMPLEMENTATION, attention_implementation
from lvpruning.config import PruningConfig, check_schedule
from lvpruning.decision import DecisionModule, decide, gumbel_decisions
from lvpruning.generation import generate
from lvpruning.layout import VisionLayout, equalize_vision
from lvpruning.policies import LearnedPolicy, PruningPolicy
from lvpruning.stage import LayerRecord, MergePlan, StageInput, TokenSequence, gather_tokens, keep_count, split_tokens


@dataclass
class LVPruningOutput(ModelOutput):
    """loss = lambda_causal * lm_loss + lambda_ratio * ratio_loss (eq. 12) in training mode; the LM loss on the
    pruned sequence in inference mode when labels are given.

    keep_fractions: (B, S) realized fraction of the original vision tokens kept after each stage.
    token_index: (B, N_out) original position of each output position (inference removes tokens).
    kept_vision: per stage, (B, k_s) indices (into the Nv vision tokens) of the tokens kept, in sequence order
        (inference); where samples keep different numbers, k_s is the largest and a sample's surplus entries are -1.
    last_hidden_state: (B, n, C) the final-normed hidden states the logits come from (inference).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    ratio_loss: torch.Tensor | None = None
    keep_fractions: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    kept_vision: tuple[torch.Tensor, ...] | None = None
    cache: PrunedCache | None = None
    last_hidden_state: torch.Tensor | None = None


class PrunedCache(DynamicCache):
    """A ``DynamicCache`` whose layers after each stage hold fewer tokens. It also remembers, per segment of
    layers, which cached tokens are padding, and the last original position, for the decoding steps."""

    paddings: list[torch.Tensor]  # per segment, (B, cached length) bool
    position_ids: torch.Tensor  # (B, 1), or (3, B, 1) on Qwen-VL: the position the last token took
    stage_layers: tuple[int, ...]  # the decoder layers a segment ends after (a vision-tower stage ends none)


@dataclass
class Prepared:
    """The prompt as the stages see it (``LVPruningModel._prepare``): in the equalized layout when samples have
    different numbers of vision tokens (``input_ids``/``labels`` then differ from the caller's)."""

    seq: TokenSequence
    input_ids: torch.Tensor  # (B, N0)
    labels: torch.Tensor | None  # (B, N0)
    vision_counts: torch.Tensor  # (B,) n_b
    layout: VisionLayout  # (B, Nv)
    vision_states: Any  # the adapter's tower states for the vision-tower stage (``adapter.vision_tower``), or None
    layout_host: VisionLayout | None = None  # the layout on the CPU (values known even when running on meta)

    @property
    def num_vision(self) -> int:
        """Nv: vision slots per sample."""
        return self.layout.kind.shape[1]


@dataclass
class PrefillState:
    """What the inference forward carries from layer to layer: the tokens still in the sequence, and what the
    stages so far kept and recorded."""

    seq: TokenSequence  # the current sequence, N tokens
    input_ids: torch.Tensor  # (B, N0) the prompt
    pixel_values: torch.Tensor  # (B, 3, H, W), (B, tiles, 3, H, W), or (B, patches, D) (Qwen-VL)
    num_vision: int  # Nv, vision slots per sample
    vision_counts: torch.Tensor  # (B,) each sample's own vision tokens n_b
    layout: VisionLayout  # (B, Nv)
    vision_index: torch.Tensor  # (B, V) index of each kept vision token among the image's Nv
    layout_host: VisionLayout | None = None  # (B, Nv) on the CPU
    last_position: torch.Tensor | None = None  # the prompt's, for decoding (``PrunedCache.position_ids``)
    records: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, N0), by original position
    kept_vision: list[torch.Tensor] = field(default_factory=list)  # per stage, (B, k_s)
    keep_fractions: list[torch.Tensor] = field(default_factory=list)  # per stage, (B,)
    paddings: list[torch.Tensor] = field(default_factory=list)  # per segment of layers, (B, N) bool

    def record(self, layer: int, values: torch.Tensor, index: torch.Tensor) -> None:
        """Keep ``values`` (B, n) of the tokens at original positions ``index`` (B, n) for the later stages
        (``StageInput.recorded(layer)``); 0 at every other position."""
        self.records[layer] = values.new_zeros(self.input_ids.shape).scatter(1, index, values)

    def apply_plan(self, stage: StageInput, plan: MergePlan, k: torch.Tensor) -> None:
        """Carry out ``plan``, the vision tokens ``stage`` keeps, ``k`` (B,) of them per sample: merge, then remove
        the others (eqs. 13-14). ``plan.keep`` (B, max k) ranks them best first; a sample's slots beyond its own
        k_b become padding."""
        surplus = torch.arange(plan.keep.shape[1], device=k.device)[None, :] >= k[:, None]  # (B, max k)
        top, order = plan.keep.sort(dim=1)  # (B, max k) in sequence order, eq. 13
        kept_pos = stage.vision_pos.gather(1, top)  # (B, max k) positions in the sequence
        alive = self.seq.padding.scatter(1, kept_pos, ~surplus.to(kept_pos.device).gather(1, order))
        alive &= self.seq.padding
        hidden = self.seq.hidden
        if plan.hidden is not None:  # merged tokens replace the kept ones in their slots (positions unchanged)
            merged = gather_tokens(plan.hidden, order).to(hidden.dtype)  # (B, k, C)
            hidden = hidden.scatter(1, kept_pos[..., None].expand_as(merged), merged)
        if plan.values is not None:  # read back by later stages as StageInput.recorded(layer)
            self.record(stage.layer, plan.values.gather(1, order), self.seq.index.gather(1, kept_pos))
        keep_pos = torch.cat([stage.text_pos, kept_pos], dim=1).sort(dim=1).values  # (B, T + k)
        self.seq = dataclasses.replace(self.seq, hidden=hidden, padding=alive).select(keep_pos)  # eq. 14
        self.vision_index = self.vision_index.gather(1, top)
        self.kept_vision.append(self.vision_index.masked_fill(~alive.gather(1, kept_pos), -1))
        self.keep_fractions.append(k.float() / self.vision_counts.clamp_min(1))


@dataclass
class VisionTower:
    """The vision-tower stage's view of the CLIP tower: its hidden states (each (B, M, C_v), or (B, P, M, C_v) per
    tower pass on LLaVA-NeXT), and each encoder layer's keys computed once, shared by the attention rows."""

    adapter: DecoderAdapter
    states: tuple[torch.Tensor, ...] | None
    layout: VisionLayout  # (B, Nv) on the device
    keys_by_layer: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def passes(self) -> tuple[int, ...]:
        """(B, P) of per-pass states, () for LLaVA-1.5's single pass."""
        return tuple(self.states[0].shape[:2]) if self.states and self.states[0].dim() == 4 else ()

    def flat(self) -> tuple[torch.Tensor, ...]:
        """The states with the passes flattened into the batch, each (B * P, M, C_v)."""
        return tuple(s.flatten(0, 1) for s in self.states) if self.passes else self.states

    def keys(self, layer: int) -> torch.Tensor:
        """Encoder layer ``layer``'s keys (B, h_v, M, d_v), or (B, P, h_v, M, d_v) per pass."""
        if layer not in self.keys_by_layer:
            keys = self.adapter.vision_keys(layer, self.flat())  # (B [* P], h_v, M, d_v)
            self.keys_by_layer[layer] = keys.unflatten(0, self.passes) if self.passes else keys
        return self.keys_by_layer[layer]

    def attention(self, layer: int, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder layer ``layer``'s softmax attention (B, h_v, Q, M) of the tower tokens ``queries`` (B, Q); per
        pass, ``queries`` (B, P, Q) -> (B, P, h_v, Q, M)."""
        keys = self.keys(layer)
        if not self.passes:
            return self.adapter.vision_attention_rows(layer, self.states, queries, keys)
        flat_queries = None if queries is None else queries.flatten(0, 1)  # (B * P, Q)
        rows = self.adapter.vision_attention_rows(layer, self.flat(), flat_queries, keys.flatten(0, 1))
        return rows.unflatten(0, self.passes)  # (B, P, h_v, Q, M)

    def stage_fields(self) -> dict[str, Any]:
        """The ``StageInput`` fields of the vision-tower stage (none where the tower is not read: OneVision)."""
        if self.states is None:
            return {}
        tower_pass, tower_token = self.adapter.tower_tokens(self.layout)
        return {
            "vision_states": self.states,
            "vision_attention": self.attention,
            "vision_keys": self.keys,
            "project": self.adapter.project,
            "feature_layer": self.adapter.feature_layer(),
            "tower_pass": tower_pass,
            "tower_token": tower_token,
        }


class LVPruningModel(nn.Module):
    """A frozen LLaVA with LVPruning decision modules after ``config.layers``.

    ``model.train()`` selects training mode (hard Gumbel decisions as attention masks, losses of eq. 12);
    ``model.eval()`` selects inference mode (top-k removal). The base model always stays in eval mode.
    """

    def __init__(self, model: nn.Module, config: PruningConfig):
        super().__init__()
        self.adapter = get_adapter(model)
        text_config = self.adapter.text_config
        config.check_model(text_config.num_hidden_layers, text_config.hidden_size)
        self.config = config
        self.model = model
        self.decision_modules = nn.ModuleList(
            DecisionModule(
                text_config.hidden_size, config.num_blocks, config.num_heads, config.ffn_dim, config.decision_dim
            )
            for _ in config.layers
        )
        param = next(model.parameters())
        self.decision_modules.to(device=param.device)
        self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        self.activation_checkpointing = False
        self.train(model.training)

    def activation_checkpointing_enable(self) -> None:
        """Training mode: recompute each decoder layer after the first stage in the backward pass instead of keeping
        its activations (the fp32 (B, h, N, N) attention of eq. 9 above all); same gradients, less memory."""
        self.activation_checkpointing = True

    def activation_checkpointing_disable(self) -> None:
        self.activation_checkpointing = False

    def train(self, mode: bool = True) -> LVPruningModel:
        super().train(mode)
        self.model.eval()  # frozen base: no dropout, whatever the mode of the decision modules
        return self

    def detach(self) -> nn.Module:
        """Return the base model as it was before :func:`attach` (``requires_grad`` flags restored)."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._base_requires_grad[name])
        return self.model

    # ------------------------------------------------------------------ inputs

    def _prepare(
        self, input_ids, pixel_values, image_sizes, attention_mask, labels, instruction_mask, tower_states=False
    ) -> Prepared:
        """The prompt as the stages see it: embedded, every sample with ``Nv`` vision slots (``equalize_vision``),
        its padding, positions, instruction, and each vision token's layout."""
        embedded = self.adapter.embed(input_ids, pixel_values, image_sizes, tower_states)
        embeds, vision, counts, deepstack, vision_states = embedded  # deepstack: (L, sum n_b, C) or None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not input_ids.is_meta:
            found = vision.sum(1).cpu()
            if not bool((found == counts).all()):
                raise ValueError(
                    f"each sample needs one image whose placeholders match its features: {found.tolist()} image "
                    f"tokens for {counts.tolist()} features (check image_sizes and the processor's expansion)"
                )
            if bool((counts != counts[0]).any()):
                input_ids, embeds, vision, attention_mask, labels, instruction_mask = equalize_vision(
                    input_ids, embeds, vision, attention_mask, labels, instruction_mask, counts.to(input_ids.device)
                )
        padding = attention_mask.bool()
        position_ids = self.adapter.position_ids(input_ids, attention_mask, image_sizes)  # (B, N) or (3, B, N)
        if instruction_mask is None:
            instruction_mask = padding & ~vision
            if labels is not None:
                instruction_mask &= labels == -100  # never the supervised answer tokens
        if not input_ids.is_meta and not bool((instruction_mask & ~vision).any(1).all()):
            raise ValueError("every sample needs at least one instruction token to guide the pruning")
        index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if deepstack is not None:  # each vision token's own, in the (equalized) sequence: (L, B, N, C)
            real = (vision & padding)[None, ..., None]  # a sample's vision tokens in order, as HF's features
            deepstack = deepstack.new_zeros(deepstack.shape[0], *embeds.shape).masked_scatter(real, deepstack)
        seq = TokenSequence(embeds, index, padding, position_ids, vision, instruction_mask & ~vision, deepstack)
        num_vision = int(counts.max())
        layout = self.adapter.layout(input_ids.shape[0], image_sizes, num_vision)
        device = input_ids.device
        return Prepared(seq, input_ids, labels, counts.to(device), layout.to(device), vision_states, layout)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        keep_ratios: tuple[float, ...] | None = None,
        policy: PruningPolicy | None = None,
        layers: tuple[int, ...] | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_grid_thw: torch.Tensor | None = None,
    ) -> LVPruningOutput:
        """Training mode when ``self.training`` (the inference-only arguments are unused), inference mode
        otherwise, where ``policy`` ranks the vision tokens (default: the learned decision modules) at the stages
        after ``layers`` (default: the decision modules' ``config.layers``), keeping ``keep_ratios`` (default:
        ``config.infer_ratios``) of the original vision tokens.

        input_ids/attention_mask/labels: (B, N) with the image placeholders already expanded (as the llava-hf
        processors do); pixel_values: (B, 3, H, W), or (B, tiles, 3, H, W) with image_sizes (B, 2) for LLaVA-NeXT
        and LLaVA-OneVision, or Qwen-VL's flattened patches (sum P_b, D) with image_grid_thw (B, 3);
        instruction_mask: (B, N) bool, the tokens that guide pruning. Where the samples have
        different numbers of vision tokens, the outputs' positions (``token_index``, training ``logits``) are those
        of the equalized layout (``lvpruning.layout.equalize_vision``).
        """
        if image_grid_thw is not None:  # Qwen-VL's image sizes: each image's patch grid (t, h, w)
            image_sizes = image_grid_thw
        if self.training:
            with torch.no_grad():
                prepared = self._prepare(input_ids, pixel_values, image_sizes, attention_mask, labels, instruction_mask)
            return self._forward_train(prepared)
        policy = policy or LearnedPolicy(self.decision_modules)
        layers, ratios = self.schedule(policy, layers, keep_ratios)
        tower_states = layers[0] == -1 and not policy.tower_free  # the tower's hidden states, where they are read
        prepared = self._prepare(
            input_ids, pixel_values, image_sizes, attention_mask, labels, instruction_mask, tower_states
        )
        pixel_values = self.adapter.sample_pixels(pixel_values, image_sizes)  # what the policies read
        return self._forward_infer(prepared, pixel_values, layers, ratios, policy, use_cache, logits_to_keep)

    def schedule(
        self, policy: PruningPolicy, layers: tuple[int, ...] | None, keep_ratios: tuple[float, ...] | None
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The checked (layers, keep ratios) of an inference call; the learned policy only at ``config.layers``."""
        layers = self.config.layers if layers is None else tuple(layers)
        ratios = self.config.infer_ratios if keep_ratios is None else tuple(keep_ratios)
        if isinstance(policy, LearnedPolicy) and layers != self.config.layers:
            raise ValueError(
                f"the decision modules sit after layers {list(self.config.layers)}; they cannot prune at {list(layers)}"
            )
        check_schedule(layers, ratios, self.adapter.text_config.num_hidden_layers)
        policy.check_layers(layers)
        if layers[0] == -1:
            self.adapter.check_tower_stage(policy)
        return layers, ratios

    def _forward_train(self, prepared: Prepared) -> LVPruningOutput:
        """Training mode: every decoder layer on the whole sequence; after each of ``config.layers`` the stage's
        hard Gumbel decisions, multiplied into the earlier ones (eq. 10), mask the vision tokens in the layers
        after it (eqs. 7-9). A first stage at -1 (the vision-tower stage) decides on the input embeddings and
        masks from decoder layer 0 on."""
        cfg = self.config
        layers = self.adapter.layers
        seq, num_vision, labels = prepared.seq, prepared.num_vision, prepared.labels
        # No backward work through the vision tower or the layers up to the first decision module (none at -1).
        with torch.no_grad():
            rope = self.adapter.rotary(seq.hidden, seq.position_ids)
            mask = self.adapter.attention_mask(seq.padding, seq.padding.shape[1], seq.hidden.dtype)
            position_ids = self.adapter.layer_position_ids(seq.position_ids)
            for i, layer in enumerate(layers[: cfg.layers[0] + 1]):
                seq.hidden = layer(seq.hidden, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
                seq.add_deepstack(i)  # Qwen3-VL: at every vision position, kept or masked, as HF

        allowed = boolean_causal_mask(seq.padding)  # A-bar's mask (B, 1, N, N)
        B, N = seq.padding.shape
        keep = seq.hidden.new_ones(B, num_vision, dtype=torch.float32)  # cumulative D over the vision tokens
        real = seq.padding.gather(1, split_tokens(seq.vision, num_vision)[1]).float()  # (B, Nv) 0 on empty slots
        fractions = []
        token_keep = None  # (B, N): 1 on text tokens, D_j on vision tokens (eq. 7)

        def masked_layer(layer: nn.Module, hidden: torch.Tensor, token_keep: torch.Tensor) -> torch.Tensor:
            # the attention switch inside, so that a checkpointed layer's recomputation in backward uses it too
            with attention_implementation(self.adapter.text_config, ATTN_IMPLEMENTATION):
                return layer(
                    hidden,
                    attention_mask=allowed,
                    position_embeddings=rope,
                    position_ids=position_ids,
                    token_keep=token_keep,
                )

        for i in range(cfg.layers[0], len(layers)):  # i = -1: the vision-tower stage, on the input embeddings
            if i > cfg.layers[0]:
                if self.activation_checkpointing:
                    seq.hidden = checkpoint(masked_layer, layers[i], seq.hidden, token_keep, use_reentrant=False)
                else:
                    seq.hidden = masked_layer(layers[i], seq.hidden, token_keep)
                seq.add_deepstack(i)
            if i in cfg.layers:
                text_pos, vision_pos = split_tokens(seq.vision, num_vision)
                module = self.decision_modules[cfg.layers.index(i)]
                gamma = decide(module, seq.hidden, text_pos, vision_pos, seq.instruction.gather(1, text_pos))
                keep = keep * gumbel_decisions(gamma, cfg.gumbel_tau)  # eqs. 5, 6, 10
                fractions.append((keep * real).sum(dim=1) / real.sum(dim=1))  # of each sample's own n_b
                token_keep = torch.ones(B, N, device=keep.device).scatter(1, vision_pos, keep)

        logits = self.adapter.logits(seq.hidden)
        keep_fractions = torch.stack(fractions, dim=1)  # (B, S)
        ratio_loss = self._ratio_loss(keep_fractions)
        lm_loss = causal_lm_loss(logits, labels) if labels is not None else None
        loss = cfg.lambda_ratio * ratio_loss
        if lm_loss is not None:
            loss = loss + cfg.lambda_causal * lm_loss  # eq. 12
        return LVPruningOutput(
            loss=loss,
            logits=logits,
            lm_loss=lm_loss,
            ratio_loss=ratio_loss,
            keep_fractions=keep_fractions.detach(),
            token_index=seq.index,
        )

    def _ratio_loss(self, keep_fractions: torch.Tensor) -> torch.Tensor:
        """Eq. 11 (MSE), or Huber(beta), between the realized keep fractions (B, S) and ``config.train_ratios``."""
        target = keep_fractions.new_tensor(self.config.train_ratios).expand_as(keep_fractions)
        if self.config.ratio_loss == "mse":
            return F.mse_loss(keep_fractions, target)  # eq. 11
        return F.huber_loss(keep_fractions, target, delta=self.config.huber_beta)

    def _forward_infer(
        self,
        prepared: Prepared,
        pixel_values: torch.Tensor,
        layers: tuple[int, ...],
        ratios: tuple[float, ...],
        policy: PruningPolicy,
        use_cache: bool,
        logits_to_keep: int,
    ) -> LVPruningOutput:
        """Inference mode: the decoder layers, each on the current sequence, and after each of ``layers`` a stage
        that keeps ``ratios`` of the original vision tokens and removes the rest (eqs. 13-14)."""
        seq, input_ids, num_vision = prepared.seq, prepared.input_ids, prepared.num_vision
        vision_index = torch.arange(num_vision, device=input_ids.device).expand(input_ids.shape[0], -1)  # (B, Nv)
        state = PrefillState(
            seq,
            input_ids,
            pixel_values,
            num_vision,
            prepared.vision_counts,
            prepared.layout,
            vision_index,
            prepared.layout_host,
            self.adapter.last_position(seq.position_ids, seq.padding),
        )
        cache = PrunedCache(config=self.adapter.text_config) if use_cache else None
        recorded = set(policy.recorded_layers(layers))
        if layers[0] == -1:  # the vision-tower stage, before decoder layer 0
            tower = self.adapter.vision_tower(prepared.vision_states, prepared.layout)
            self._prune(state, policy, 0, -1, ratios[0], seq.hidden, tower)
        prepared.vision_states = None  # the tower's hidden states serve only the vision-tower stage
        mask, rope = self._begin_segment(state)
        for i, layer in enumerate(self.adapter.layers):
            layer_input = state.seq.hidden  # (B, N, C)
            position_ids = self.adapter.layer_position_ids(state.seq.position_ids)
            kwargs = {"attention_mask": mask, "position_embeddings": rope, "position_ids": position_ids}
            kwargs |= {"cache": cache, "use_cache": use_cache}
            if i in recorded:
                state.seq.hidden = self._recorded_layer(state, policy, i, layer_input, **kwargs)
            else:
                state.seq.hidden = layer(layer_input, **kwargs)
            state.seq.add_deepstack(i)  # Qwen3-VL: the kept tokens' own DeepStack features, before the stage
            if i in layers:
                stage = layers.index(i)
                self._prune(state, policy, stage, i, ratios[stage], layer_input)
                mask, rope = self._begin_segment(state)
        return self._infer_output(state, prepared.labels, cache, layers, logits_to_keep)

    def _begin_segment(self, state: PrefillState) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Start the segment of layers that runs on the current sequence: remember its padding (for the decoding
        steps) and return its attention mask and RoPE (cos, sin)."""
        seq = state.seq
        state.paddings.append(seq.padding)
        rope = self.adapter.rotary(seq.hidden, seq.position_ids)
        return self.adapter.attention_mask(seq.padding, seq.padding.shape[1], seq.hidden.dtype), rope

    def _recorded_layer(
        self, state: PrefillState, policy: PruningPolicy, i: int, layer_input: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """Decoder layer ``i`` with its sub-blocks recorded: what ``policy.observe`` makes of them goes to
        ``state.records``. Returns the layer's output (B, N, C)."""
        seq = state.seq
        hidden, parts = self.adapter.recorded_layer(i, layer_input, **kwargs)
        record = LayerRecord(i, **parts, padding=seq.padding, vision=seq.vision, instruction=seq.instruction)
        state.record(i, policy.observe(record), seq.index)  # (B, N) values
        return hidden

    def _prune(
        self,
        state: PrefillState,
        policy: PruningPolicy,
        stage: int,
        layer: int,
        keep_ratio: float,
        hidden_in: torch.Tensor,
        tower: Any = None,
    ) -> None:
        """Stage ``stage``, after decoder layer ``layer`` (-1: the vision tower) whose input was ``hidden_in``: the
        policy plans, and ``state`` keeps ``k_s = keep_count(rho_s, n_b)`` vision tokens of each sample (merged if
        it says so)."""
        B = state.vision_index.shape[0]
        counts = state.vision_counts.tolist() if not state.vision_counts.is_meta else [state.num_vision] * B
        k = [keep_count(keep_ratio, n) for n in counts]
        stage_input = self._stage_input(state, stage, layer, hidden_in, tower, tuple(k))
        plan = policy.plan(stage_input, max(k))
        if len(set(k)) > 1 and plan.hidden is not None and not policy.per_sample_budgets:
            raise ValueError(
                f"{policy.name} merges tokens at layer {layer} and needs every sample of a batch to keep as many; "
                f"this batch keeps {k} (images of different sizes): batch images of one size"
            )
        per_sample = torch.tensor(k, device=state.vision_index.device).expand(stage_input.vision_pos.shape[0])
        state.apply_plan(stage_input, plan, per_sample)

    def _stage_input(
        self,
        state: PrefillState,
        stage: int,
        layer: int,
        hidden_in: torch.Tensor,
        tower: Any,
        keep_counts: tuple[int, ...],
    ) -> StageInput:
        """What the policy reads at ``stage``: the current sequence (the layer's output) and readers of attention."""
        seq = state.seq
        text_pos, vision_pos = split_tokens(seq.vision, state.vision_index.shape[1])
        if layer == -1:
            attention = no_decoder_attention
        else:
            attention = functools.partial(self.adapter.attention_rows, layer, hidden_in, seq.position_ids, seq.padding)
        next_attention = functools.partial(
            self.adapter.attention_rows, layer + 1, seq.hidden, seq.position_ids, seq.padding
        )
        return StageInput(
            stage=stage,
            layer=layer,
            hidden_in=hidden_in,
            hidden_out=seq.hidden,
            text_pos=text_pos,
            vision_pos=vision_pos,
            vision_index=state.vision_index,
            num_vision=state.num_vision,
            vision_counts=state.vision_counts,
            layout=state.layout,
            layout_host=state.layout_host,
            keep_counts=keep_counts,
            token_index=seq.index,
            instruction=seq.instruction,
            padding=seq.padding,
            position_ids=seq.position_ids,
            input_ids=state.input_ids,
            pixel_values=state.pixel_values,
            records=MappingProxyType(state.records),
            attention=attention,
            next_attention=next_attention,
            **(tower.stage_fields() if tower is not None else {}),
        )

    def _infer_output(
        self,
        state: PrefillState,
        labels: torch.Tensor | None,
        cache: PrunedCache | None,
        layers: tuple[int, ...],
        logits_to_keep: int,
    ) -> LVPruningOutput:
        """Logits of the last ``logits_to_keep`` positions (0: all) of the pruned sequence, the loss against
        ``labels`` at the surviving positions, and the cache with what the decoding steps need."""
        seq = state.seq
        last_hidden_state = self.adapter.norm(seq.hidden[:, -logits_to_keep:])
        logits = self.adapter.head(last_hidden_state)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels.gather(1, seq.index[:, -logits.shape[1] :]))
        if cache is not None:
            cache.paddings, cache.position_ids = state.paddings, state.last_position
            cache.stage_layers = tuple(i for i in layers if i >= 0)
        return LVPruningOutput(
            loss=loss,
            logits=logits,
            keep_fractions=torch.stack(state.keep_fractions, dim=1),
            token_index=seq.index,
            kept_vision=tuple(state.kept_vision),
            cache=cache,
            last_hidden_state=last_hidden_state,
        )

    # ------------------------------------------------------------------ generation

    def decode_step(self, input_ids: torch.Tensor, cache: PrunedCache) -> torch.Tensor:
        """One cached decoding step after a pruned prefill: input_ids (B, 1) -> logits (B, 1, vocab)
        (:func:`decode_step`)."""
        return decode_step(self.adapter, input_ids, cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Pruned generation; see :func:`lvpruning.generation.generate` for the arguments."""
        return generate(self, input_ids, pixel_values, **kwargs)


def decode_step(adapter: DecoderAdapter, input_ids: torch.Tensor, cache: PrunedCache) -> torch.Tensor:
    """One cached decoding step of ``adapter``'s decoder after a pruned prefill: input_ids (B, 1) -> logits (B, 1,
    vocab).

    Every segment of layers keeps its own (shorter) cache; the new token takes the position after the last
    original position, as if nothing had been pruned (on Qwen-VL, HF's ``rope_deltas`` rule)."""
    hidden = adapter.embed_tokens(input_ids)  # (B, 1, C)
    cache.position_ids = cache.position_ids + 1
    rope = adapter.rotary(hidden, cache.position_ids)
    masks = []
    for s, padding in enumerate(cache.paddings):
        cache.paddings[s] = torch.cat([padding, padding.new_ones(padding.shape[0], 1)], dim=1)
        masks.append(adapter.attention_mask(cache.paddings[s], 1, hidden.dtype))
    segment = 0
    for i, layer in enumerate(adapter.layers):
        hidden = layer(
            hidden,
            attention_mask=masks[segment],
            position_embeddings=rope,
            position_ids=adapter.layer_position_ids(cache.position_ids),
            cache=cache,
            use_cache=True,
        )
        segment += i in cache.stage_layers
    return adapter.logits(hidden)


def no_decoder_attention(queries: torch.Tensor) -> torch.Tensor:
    """``StageInput.attention`` at the vision-tower stage, which follows no decoder layer."""
    raise ValueError("the vision-tower stage (layer -1) follows no decoder layer: read vision_attention instead")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the supervised positions (labels -100 are ignored)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
    )


def attach(model: nn.Module, config: PruningConfig | None = None) -> LVPruningModel:
    """Attach fresh decision modules to ``model`` (frozen, otherwise untouched)."""
    return LVPruningModel(model, config or PruningConfig())
