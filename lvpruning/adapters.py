"""Model-family adapters: everything the pruning engine needs to know about where a model keeps its parts.

The engine (``lvpruning.engine``) only talks to an adapter: how to embed a prompt with its images (which positions
are vision tokens, how many each sample has, where each comes from), the decoder layers, the rotary embedding, the
final norm and head, and how to build an attention mask in the format of the model's own attention implementation.
One adapter serves the LLaVA families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision) with the decoders they ship (Llama,
Mistral, Qwen2); what differs between decoders (biases, the rotary code) comes from the decoder's own modules.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from lvpruning.layout import VisionLayout, base_grid_layout, packed_cells, tower_tokens
from lvpruning.stage import gather_tokens

if TYPE_CHECKING:
    from lvpruning.policies import PruningPolicy

FAMILIES = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)
DECODERS = ("llama", "mistral", "qwen2")


class DecoderAdapter:
    """The decoder side every family shares (``model.model.language_model``, ``model.lm_head``): its layers, rotary
    embedding, final norm and head, recomputed attention rows, recorded layers and masks. A family's adapter adds
    how a prompt is embedded with its images, where each vision token comes from, and its positions.

    Position ids are in the model's own format, tokens on the last axis: (B, N) for the 1-D RoPE of the LLaVA
    families, (3, B, N) for Qwen-VL's M-RoPE; ``rotary`` hands them to the decoder's own ``rotary_emb``."""

    def __init__(self, model: nn.Module):
        text_config = model.config.text_config
        if getattr(text_config, "sliding_window", None) is not None and (
            text_config.model_type == "mistral" or getattr(text_config, "use_sliding_window", False)
        ):
            raise ValueError(
                f"text_config.sliding_window = {text_config.sliding_window}: LVPruning's masks and attention rows "
                "are full causal; none of the supported checkpoints (llava-v1.6-mistral-7b, llava-onevision-qwen2, "
                "Qwen2-VL, Qwen2.5-VL) turns the window on"
            )
        self.model = model
        self.decoder = model.model.language_model
        self.rotary_code = sys.modules[type(self.decoder.layers[0].self_attn).__module__].apply_rotary_pos_emb

    @property
    def text_config(self) -> PreTrainedConfig:
        return self.model.config.text_config

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_sizes) -> torch.Tensor:
        """The prompt's padding-aware positions, as HF ``generate`` gives them: ``cumsum(attention_mask) - 1``,
        (B, N)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def last_position(self, position_ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """The position the first decoded token follows (it takes this + 1, and each next one + 1 more), from the
        prompt's positions (left-padded): the last token's, (B, 1)."""
        return position_ids[..., -1:]

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The ``position_ids`` a decoder layer receives beside its RoPE (read by FlashAttention only)."""
        return position_ids

    def vision_tower(self, states, layout: VisionLayout):
        """The vision-tower stage's view of the tower from ``embed``'s states: none by default (a family whose
        tower is not read runs only the policies that read nothing of it, ``tower_free``)."""
        return None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, position_ids=position_ids)

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm: the last hidden state the LM head reads."""
        return self.decoder.norm(hidden)

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head on final-normed hidden states."""
        return self.model.lm_head(normed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))

    def attention_rows(
        self,
        layer_index: int,
        layer_input: torch.Tensor,
        position_ids: torch.Tensor,
        padding: torch.Tensor,
        queries: torch.Tensor,
    ) -> torch.Tensor:
        """The softmax attention (B, h, Q, N) that the tokens at ``queries`` (B, Q) pay every token in decoder layer
        ``layer_index``, recomputed from the layer's input (B, N, C) with its own weights: only these Q rows, in
        fp32. Keys that are padding (``padding`` (B, N) False) or later than the query (causal) get 0. The
        attention module's own q/k norms (Qwen3-VL) and ``apply_rotary_pos_emb`` apply as in its forward."""
        attn = self.layers[layer_index].self_attn
        h = self.layers[layer_index].input_layernorm(layer_input)
        B, N, _ = h.shape
        Q = queries.shape[1]
        q = attn.q_proj(gather_tokens(h, queries)).view(B, Q, -1, attn.head_dim)  # (B, Q, h, d)
        k = attn.k_proj(h).view(B, N, -1, attn.head_dim)  # (B, N, h_kv, d)
        if hasattr(attn, "q_norm"):  # Qwen3-VL: an RMSNorm over each head's width, before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, Q, d), (B, h_kv, N, d)
        cos, sin = self.rotary(h, position_ids)  # (B, N, d)
        q, _ = self.rotary_code(q, q, gather_tokens(cos, queries), gather_tokens(sin, queries))
        _, k = self.rotary_code(k, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, h, N, d)
        scores = (q.float() @ k.float().transpose(2, 3)) * attn.scaling  # (B, h, Q, N), fp32 as in eager
        later = torch.arange(N, device=h.device)[None, None, :] > queries[..., None]  # (B, Q, N)
        hidden = later | ~padding[:, None, :]
        scores = scores.masked_fill(hidden[:, None], float("-inf"))
        return torch.nan_to_num(scores.softmax(dim=-1))  # a padding query sees no key: a row of 0

    def recorded_layer(self, layer_index: int, hidden: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict]:
        """Decoder layer ``layer_index`` run sub-block by sub-block (as ``LlamaDecoderLayer.forward``), returning its
        output and the sub-blocks' normed inputs and outputs: ``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``."""
        layer = self.layers[layer_index]
        attn_in = layer.input_layernorm(hidden)
        attn_out, _ = layer.self_attn(hidden_states=attn_in, **kwargs)
        hidden = hidden + attn_out
        mlp_in = layer.post_attention_layernorm(hidden)
        mlp_out = layer.mlp(mlp_in)
        parts = {"attn_in": attn_in, "attn_out": attn_out, "mlp_in": mlp_in, "mlp_out": mlp_out}
        return hidden + mlp_out, parts

    def attention_mask(self, padding: torch.Tensor, q_length: int, dtype: torch.dtype):
        """A causal + padding mask for the last ``q_length`` of the ``padding.shape[1]`` keys, in the format of
        the model's own attention implementation (``None`` where it can use ``is_causal``)."""
        kv_length = padding.shape[1]
        make_mask = ALL_MASK_ATTENTION_FUNCTIONS[self.text_config._attn_implementation]
        return make_mask(
            batch_size=padding.shape[0],
            q_length=q_length,
            kv_length=kv_length,
            q_offset=kv_length - q_length,
            mask_function=causal_mask_function,
            attention_mask=padding,
            allow_is_causal_skip=True,
            dtype=dtype,
            config=self.text_config,
            device=padding.device,
        )


class LlavaAdapter(DecoderAdapter):
    """Hugging Face ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration`` and
    ``LlavaOnevisionForConditionalGeneration`` (anyres tiles, ``image_sizes``), with a Llama, Mistral or Qwen2
    decoder."""

    def __init__(self, model: nn.Module):
        text_config = model.config.text_config
        if text_config.model_type not in DECODERS:
            raise ValueError(f"LVPruning supports the decoders {DECODERS}, got '{text_config.model_type}'")
        super().__init__(model)
        self.tiled = not isinstance(model, LlavaForConditionalGeneration)
        self.cells: dict[tuple[int, int], torch.Tensor] = {}  # image size -> packed_cells, computed once

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's encoder layers (CLIP)."""
        return self.model.model.vision_tower.encoder.layers

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        tower_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, tuple[torch.Tensor, ...] | None]:
        """Token embeddings with the projected image features scattered in (HF's ``get_image_features`` ->
        ``get_placeholder_mask`` -> ``masked_scatter`` hand-off), one image per sample. Returns embeddings
        (B, N, C), the vision mask (B, N), each sample's number of vision tokens (B,), known from shapes alone (so
        ``meta`` tensors work), no DeepStack features (Qwen3-VL's only: ``Qwen3VLAdapter.embed``), and with
        ``tower_states`` the vision tower's hidden states, CLS first, index ``l``
        encoder layer ``l``'s input: each (B, M, C_v) for LLaVA-1.5, (B, P, M, C_v) per tower pass for LLaVA-NeXT
        (the base view, then each tile: P the batch's most, a sample's missing passes zero); ``None`` otherwise
        and for OneVision (its SigLIP tower has no CLS token for the tower methods to read).

        ``pixel_values``: (B, 3, H, W) for LLaVA-1.5; (B, tiles, 3, H, W) with ``image_sizes`` (B, 2) (height,
        width) for the tiled families, as their processors return them."""
        inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, N, C)
        if self.tiled:
            if image_sizes is None:
                raise ValueError(f"{type(self.model).__name__} needs image_sizes beside pixel_values")
            tower_states = tower_states and isinstance(self.model, LlavaNextForConditionalGeneration)
            image = self.model.model.get_image_features(
                pixel_values=pixel_values, image_sizes=image_sizes, output_hidden_states=tower_states
            )
        else:
            image = self.model.model.get_image_features(
                pixel_values=pixel_values, return_dict=True, output_hidden_states=tower_states
            )
        per_image = list(image.pooler_output)  # B x (n_b, C)
        features = torch.cat(per_image, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = self.model.model.get_placeholder_mask(input_ids, inputs_embeds, features)  # (B, N, C)
        if isinstance(placeholder, tuple):  # OneVision's: (images, videos)
            placeholder = placeholder[0]
        inputs_embeds = inputs_embeds.masked_scatter(placeholder, features)
        vision_mask = input_ids == self.model.config.image_token_id  # (B, N)
        counts = torch.tensor([f.shape[0] for f in per_image], device="cpu")
        states = None
        if tower_states:
            states = tuple(image.hidden_states)
            if self.tiled:
                states = self._per_pass(states, self._passes(image_sizes))
        return inputs_embeds, vision_mask, counts, None, states

    def _passes(self, image_sizes: torch.Tensor) -> list[int]:
        """Tower passes of each image (the base view + its tiles), as HF's ``get_image_features`` counts them."""
        tile = self.model.config.vision_config.image_size
        grid = self.model.config.image_grid_pinpoints
        return [image_size_to_num_patches(size, grid, tile) for size in image_sizes.tolist()]

    @staticmethod
    def _per_pass(states: tuple[torch.Tensor, ...], passes: list[int]) -> tuple[torch.Tensor, ...]:
        """The tower's hidden states over all real tiles of the batch, each (sum P_b, M, C_v), as (B, P, M, C_v)
        per sample (P = max P_b; zero passes beyond a sample's own)."""
        out = []
        for hidden in states:
            padded = hidden.new_zeros(len(passes), max(passes), *hidden.shape[1:])  # (B, P, M, C_v)
            for b, chunk in enumerate(hidden.split(passes)):
                padded[b, : chunk.shape[0]] = chunk
            out.append(padded)
        return tuple(out)

    def sample_pixels(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """The images as the policies read them (``StageInput.pixel_values``), one row per sample: as given."""
        return pixel_values

    def layout(self, num_samples: int, image_sizes: torch.Tensor | None, num_slots: int) -> VisionLayout:
        """Where each vision token comes from (:class:`~lvpruning.layout.VisionLayout`), (B, ``num_slots``): the
        base grid, or on the tiled families HF's own packing (:func:`~lvpruning.layout.packed_cells`)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        if not self.tiled:
            return base_grid_layout(num_samples, side, num_slots)
        rows = []
        for size in map(tuple, image_sizes.tolist()):
            if size not in self.cells:
                self.cells[size] = packed_cells(self.model.config, list(size))
            rows.append(self.cells[size])
        return VisionLayout.stack(rows, num_slots)

    def check_tower_stage(self, policy: PruningPolicy) -> None:
        """Fail before any model work where ``policy`` cannot run the vision-tower stage on this model: on the tiled
        families only a policy that reads the tower per tile (``tower_tiles``), and on OneVision none that reads
        the CLS token's attention (``tower_cls``: SigLIP has no CLS token)."""
        name = type(self.model).__name__
        if not self.tiled:
            return
        if not policy.tower_tiles:
            raise ValueError(
                f"{policy.name}'s vision-tower stage (layer -1) runs on LLaVA-1.5 only; {name} encodes each tile "
                "apart, which it does not read"
            )
        if policy.tower_cls and not isinstance(self.model, LlavaNextForConditionalGeneration):
            raise ValueError(
                f"{policy.name} ranks by the tower's CLS attention; {name}'s SigLIP tower has no CLS token, so its "
                "vision-tower stage runs on LLaVA-1.5 and LLaVA-NeXT (CLIP) only"
            )

    def vision_tower(self, states: tuple[torch.Tensor, ...] | None, layout: VisionLayout):
        """The vision-tower stage's view of the tower (:class:`lvpruning.engine.VisionTower`) from ``embed``'s
        states."""
        from lvpruning.engine import VisionTower  # it builds on this module

        return VisionTower(self, states, layout)

    def tower_tokens(self, layout: VisionLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Each vision token's tower pass and tower token (:func:`lvpruning.layout.tower_tokens`)."""
        vision = self.model.config.vision_config
        return tower_tokens(layout, vision.image_size // vision.patch_size)

    def feature_layer(self) -> int:
        """The encoder layer whose output LLaVA projects (``hidden_states[-2]``: layer 22 of 24 in LLaVA-1.5 and
        LLaVA-NeXT). The vision-tower stage maps vision tokens to tower tokens (:meth:`tower_tokens`) under their
        feature selection only (CLS dropped)."""
        config = self.model.config
        layer = config.vision_feature_layer
        if config.vision_feature_select_strategy != "default" or not isinstance(layer, int):
            raise ValueError(
                "a vision-tower stage (layer -1) needs LLaVA-1.5's feature selection (one vision_feature_layer, "
                f"strategy 'default'); got {layer!r}, {config.vision_feature_select_strategy!r}"
            )
        return (layer % (len(self.vision_layers) + 1)) - 1

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """LLaVA's projector on tower features (B, n, C_v) -> (B, n, C)."""
        return self.model.model.multi_modal_projector(features)

    def vision_keys(self, layer_index: int, states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Encoder layer ``layer_index``'s keys (B, h, M, d) from its input ``states[layer_index]``."""
        layer = self.vision_layers[layer_index]
        h = layer.layer_norm1(states[layer_index])
        return layer.self_attn.k_proj(h).view(*h.shape[:2], -1, layer.self_attn.head_dim).transpose(1, 2)

    def vision_attention_rows(
        self,
        layer_index: int,
        states: tuple[torch.Tensor, ...],
        queries: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The softmax attention (B, h, Q, M) that the tower tokens ``queries`` (B, Q) (all M when ``None``) pay every
        tower token in encoder layer ``layer_index``, recomputed in fp32 from that layer's input ``states[layer_index]``
        with its own weights (CLIP: bidirectional, no mask), so the tower keeps its SDPA attention. ``keys``: that
        layer's :meth:`vision_keys`, when the caller has them already."""
        layer = self.vision_layers[layer_index]
        attn = layer.self_attn
        h = layer.layer_norm1(states[layer_index])  # (B, M, C_v)
        rows = h if queries is None else gather_tokens(h, queries)
        q = attn.q_proj(rows).view(*rows.shape[:2], -1, attn.head_dim).transpose(1, 2)  # (B, h, Q, d)
        k = self.vision_keys(layer_index, states) if keys is None else keys  # (B, h, M, d)
        return ((q.float() @ k.float().transpose(2, 3)) * attn.scale).softmax(dim=-1)


def boolean_causal_mask(padding: torch.Tensor) -> torch.Tensor:
    """The causal + padding mask as booleans (B, 1, N, N), True where attention is allowed (``A-bar``, eq. 8)."""
    B, N = padding.shape
    return sdpa_mask(
        batch_size=B,
        q_length=N,
        kv_length=N,
        attention_mask=padding,
        allow_is_causal_skip=False,
        device=padding.device,
    )


def from_pretrained(name_or_path: str, **kwargs) -> nn.Module:
    """A supported model by hub id or local path, its class from its config (LLaVA-1.5, LLaVA-NeXT,
    LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL), with ``from_pretrained``'s keyword arguments; anything else
    fails naming what is supported."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(name_or_path)
    supported = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    if config.model_type not in supported:
        raise ValueError(f"{name_or_path}: model type {config.model_type!r}; supported: {sorted(supported)}")
    return AutoModelForImageTextToText.from_pretrained(name_or_path, config=config, **kwargs)


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model``, or a clear error naming what is supported."""
    from lvpruning.qwen3_vl import Qwen3VLAdapter  # they build on this module
    from lvpruning.qwen_vl import QWEN_VL_FAMILIES, QwenVLAdapter

    if isinstance(model, FAMILIES):
        return LlavaAdapter(model)
    if isinstance(model, Qwen3VLForConditionalGeneration):
        return Qwen3VLAdapter(model)
    if isinstance(model, QWEN_VL_FAMILIES):
        return QwenVLAdapter(model)
    names = ", ".join(f.__name__ for f in (*FAMILIES, *QWEN_VL_FAMILIES, Qwen3VLForConditionalGeneration))
    raise ValueError(
        f"LVPruning has no adapter for {type(model).__name__}; supported: {names} (the LLaVA families with a "
        f"decoder of {DECODERS}; e.g. llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf, "
        "llava-hf/llava-onevision-qwen2-7b-ov-hf, Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, "
        "Qwen/Qwen3-VL-8B-Instruct)"
    )


def vision_attention_rows_flops(vision_config: PreTrainedConfig, num_queries: int, num_keys: int) -> int:
    """Matmul FLOPs of :meth:`LlavaAdapter.vision_attention_rows`: q_proj on the queries, k_proj on every
    tower token, and Q K^T for every head (together the width)."""
    d = vision_config.hidden_size
    return 2 * num_queries * d * d + 2 * num_keys * d * d + 2 * num_queries * num_keys * d


def projector_flops(config: PreTrainedConfig, num_tokens: int) -> int:
    """Matmul FLOPs of LLaVA's projector (Linear(C_v, C), GELU, Linear(C, C)) on ``num_tokens`` tower features."""
    c = config.text_config.hidden_size
    return 2 * num_tokens * config.vision_config.hidden_size * c + 2 * num_tokens * c * c


def attention_rows_flops(text_config: PreTrainedConfig, num_queries: int, num_keys: int) -> int:
    """Matmul FLOPs of :meth:`LlavaAdapter.attention_rows`: W_q on the queries, W_k on every key (GQA-aware),
    and Q K^T for every query head."""
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    projections = 2 * num_queries * hidden * heads * head_dim + 2 * num_keys * hidden * kv_heads * head_dim
    return projections + 2 * num_queries * num_keys * heads * head_dim
