"""Model-family adapters: everything the pruning engine needs to know about where a model keeps its parts.

The engine (``lvpruning.engine``) only talks to an adapter: how to embed a prompt with its images (and which
positions are vision tokens), the decoder layers, the rotary embedding, the final norm and head, and how to build
an attention mask in the format of the model's own attention implementation. LLaVA-NeXT or Qwen2-VL follow by
adding an adapter here, without touching the engine.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lvpruning.stage import gather_tokens


class LlavaLlamaAdapter:
    """Hugging Face ``LlavaForConditionalGeneration`` with a Llama-family decoder (LLaVA-1.5)."""

    decoder_types = ("llama",)

    def __init__(self, model: LlavaForConditionalGeneration):
        text_type = model.config.text_config.model_type
        if text_type not in self.decoder_types:
            raise ValueError(
                f"LlavaLlamaAdapter supports Llama-family decoders {self.decoder_types}, got '{text_type}'"
            )
        self.model = model
        self.decoder = model.model.language_model

    @property
    def text_config(self) -> PreTrainedConfig:
        return self.model.config.text_config

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's encoder layers (CLIP)."""
        return self.model.model.vision_tower.encoder.layers

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, tower_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, int, tuple[torch.Tensor, ...] | None]:
        """Token embeddings with the projected image features scattered in (HF's ``get_image_features`` ->
        ``get_placeholder_mask`` -> ``masked_scatter`` hand-off). Returns embeddings (B, N, C), the vision mask
        (B, N), the number of vision tokens per sample, known from shapes alone (so ``meta`` tensors work), and with
        ``tower_states`` the vision tower's hidden states (each (B, M, C_v), CLS first: index ``l`` is encoder layer
        ``l``'s input; otherwise ``None``)."""
        inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, N, C)
        image = self.model.model.get_image_features(
            pixel_values=pixel_values, return_dict=True, output_hidden_states=tower_states
        )
        features = torch.cat(list(image.pooler_output), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = self.model.model.get_placeholder_mask(input_ids, inputs_embeds, features)  # (B, N, C)
        inputs_embeds = inputs_embeds.masked_scatter(placeholder, features)
        vision_mask = input_ids == self.model.config.image_token_id  # (B, N)
        num_vision = features.shape[0] // input_ids.shape[0]
        return inputs_embeds, vision_mask, num_vision, tuple(image.hidden_states) if tower_states else None

    def feature_layer(self) -> int:
        """The encoder layer whose output LLaVA projects (``hidden_states[-2]``: layer 22 of 24 in LLaVA-1.5). The
        vision-tower stage maps vision token ``j`` to tower token ``j + 1``: LLaVA-1.5's feature selection only."""
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
        fp32. Keys that are padding (``padding`` (B, N) False) or later than the query (causal) get 0."""
        attn = self.layers[layer_index].self_attn
        h = self.layers[layer_index].input_layernorm(layer_input)
        B, N, _ = h.shape
        Q = queries.shape[1]
        q = attn.q_proj(gather_tokens(h, queries)).view(B, Q, -1, attn.head_dim).transpose(1, 2)  # (B, h, Q, d)
        k = attn.k_proj(h).view(B, N, -1, attn.head_dim).transpose(1, 2)  # (B, h_kv, N, d)
        cos, sin = self.rotary(h, position_ids)  # (B, N, d)
        q, _ = apply_rotary_pos_emb(q, q, gather_tokens(cos, queries), gather_tokens(sin, queries))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
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


def get_adapter(model: nn.Module) -> LlavaLlamaAdapter:
    """The adapter for ``model``, or a clear error naming what is supported."""
    if isinstance(model, LlavaForConditionalGeneration):
        return LlavaLlamaAdapter(model)
    raise ValueError(
        f"LVPruning has no adapter for {type(model).__name__}; supported: LlavaForConditionalGeneration with a "
        f"Llama-family decoder (e.g. llava-hf/llava-1.5-7b-hf)"
    )


def vision_attention_rows_flops(vision_config: PreTrainedConfig, num_queries: int, num_keys: int) -> int:
    """Matmul FLOPs of :meth:`LlavaLlamaAdapter.vision_attention_rows`: q_proj on the queries, k_proj on every
    tower token, and Q K^T for every head (together the width)."""
    d = vision_config.hidden_size
    return 2 * num_queries * d * d + 2 * num_keys * d * d + 2 * num_queries * num_keys * d


def projector_flops(config: PreTrainedConfig, num_tokens: int) -> int:
    """Matmul FLOPs of LLaVA's projector (Linear(C_v, C), GELU, Linear(C, C)) on ``num_tokens`` tower features."""
    c = config.text_config.hidden_size
    return 2 * num_tokens * config.vision_config.hidden_size * c + 2 * num_tokens * c * c


def attention_rows_flops(text_config: PreTrainedConfig, num_queries: int, num_keys: int) -> int:
    """Matmul FLOPs of :meth:`LlavaLlamaAdapter.attention_rows`: W_q on the queries, W_k on every key (GQA-aware),
    and Q K^T for every query head."""
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    projections = 2 * num_queries * hidden * heads * head_dim + 2 * num_keys * hidden * kv_heads * head_dim
    return projections + 2 * num_queries * num_keys * heads * head_dim
