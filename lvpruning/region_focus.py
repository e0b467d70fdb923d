"""LRS-VQA's Region Focus Module (Luo et al., ICCV 2025): a few decoder layers copied from the LLM's own, which score
the vision tokens by the attention of the last instruction token, trained by distilling the frozen LLM's
text-to-image attention beside the language-model loss. Our reading of the reference: ``docs/methods.md``,
"LRS-VQA".

The module holds ``K + 1`` copies of the LLM's decoder layers ``[l_1 - 1, l_1, ..., l_K]`` (``layers`` =
``(l_1, ..., l_K)``, 0-based, the reference's ``llm_layer_list``); the LLM itself is left as it is. It runs its
copies on the LLM's input embeddings; the attention logits of its layer ``k + 1`` (the copy of ``l_{k+1}``) on its
hidden state after its layer ``k`` stand for the LLM's logits in layer ``l_{k+1}`` (``S_k`` against ``T_k``).
Module layer ``K`` itself is never run: its output feeds nothing (the reference runs it and discards it).

Shapes: B batch, N tokens, C hidden size, h heads, Q query rows, V vision tokens scored, K = ``len(layers)``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedConfig

from lvpruning.adapters import DecoderAdapter, LlavaAdapter, attention_rows_flops, get_adapter
from lvpruning.checkpoint import model_signature, read_modules, save_modules
from lvpruning.flops import decoder_layer_flops
from lvpruning.layout import BASE
from lvpruning.stage import gather_tokens

SKIPPED_LAYERS = (1, 2)  # the reference's loss leaves out S_1 and S_2 (hard-coded ``if layer_idx in [1,2]``)
TEMPERATURE = 2.0  # tau of the image terms (``temperature = 2.0`` in the reference's loss)
DISTILLATION_TERMS = ("kl", "kl_image", "mse")  # distillation_terms' order
WEIGHTS_NAME = "region_focus.safetensors"
CONFIG_NAME = "region_focus.json"


def attention_logits(
    adapter: DecoderAdapter,
    layer: nn.Module,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    queries: torch.Tensor,
) -> torch.Tensor:
    """The raw attention logits ``q k^T / sqrt(d)`` (B, h, Q, N), fp32, no mask, that the tokens at ``queries``
    (B, Q) give every token in decoder ``layer`` (a layer of ``adapter``'s family), from its input ``hidden``
    (B, N, C): its ``input_layernorm``, ``q_proj``, ``k_proj`` and rotary code, as in its forward."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    B, N, _ = x.shape
    Q = queries.shape[1]
    q = attn.q_proj(gather_tokens(x, queries)).view(B, Q, -1, attn.head_dim).transpose(1, 2)  # (B, h, Q, d)
    k = attn.k_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)  # (B, h_kv, N, d)
    cos, sin = rope  # (B, N, d)
    q, _ = adapter.rotary_code(q, q, gather_tokens(cos, queries), gather_tokens(sin, queries))
    _, k = adapter.rotary_code(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, h, N, d)
    return (q.float() @ k.float().transpose(2, 3)) * attn.scaling


def teacher_logits(
    model: nn.Module,
    layers: Sequence[int],
    hidden_states: Sequence[torch.Tensor],
    position_ids: torch.Tensor,
    queries: torch.Tensor,
) -> list[torch.Tensor]:
    """The frozen LLM's ``T_k`` for each ``l_k`` in ``layers``: the raw logits (B, h, Q, N) of the rows ``queries``
    (B, Q) in its layer ``l_k``, from that layer's input ``hidden_states[l_k]`` (B, N, C) (Hugging Face's
    ``output_hidden_states``: index ``l`` is layer ``l``'s input), detached."""
    adapter = get_adapter(model)
    with torch.no_grad():
        rope = adapter.rotary(hidden_states[0], position_ids)
        return [attention_logits(adapter, adapter.layers[r], hidden_states[r], rope, queries) for r in layers]


def answer_rows(
    labels: torch.Tensor, padding: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation's query rows in training: the token just before each answer span (``labels`` (B, N) is
    ``ignore_index`` there and not at the next token), one per turn. Returns positions (B, Q) and which are real
    (B, Q); a sample without an answer gets its last real token (``padding`` (B, N) True at real tokens). The
    reference also drops spans that start at position 13 or before (a guard for its Qwen2 template, meaningless
    under left padding); here every span counts."""
    starts = (labels[:, 1:] != ignore_index) & (labels[:, :-1] == ignore_index)  # (B, N - 1): row p, answer p + 1
    N = labels.shape[1]
    last = N - 1 - padding.long().flip(-1).argmax(-1)  # (B,) the last real token
    per_sample = [s.nonzero()[:, 0] if bool(s.any()) else last[b : b + 1] for b, s in enumerate(starts)]
    Q = max(len(p) for p in per_sample)
    rows = torch.zeros(len(per_sample), Q, dtype=torch.long, device=labels.device)
    real = torch.zeros(len(per_sample), Q, dtype=torch.bool, device=labels.device)
    for b, p in enumerate(per_sample):
        rows[b, : len(p)], real[b, : len(p)] = p, True
    return rows, real


def check_layers(layers: Sequence[int], depth: int | None = None) -> None:
    """Fail unless ``layers`` are increasing 0-based decoder layers, the first >= 1 (its predecessor is copied too)
    and, with ``depth`` (the LLM's number of layers), the last < ``depth``."""
    layers = tuple(layers)
    beyond = depth is not None and bool(layers) and layers[-1] >= depth
    if not layers or layers[0] < 1 or list(layers) != sorted(set(layers)) or beyond:
        within = f", the last < {depth}" if depth is not None else ""
        raise ValueError(
            f"layers {list(layers)}: give increasing 0-based decoder layers, the first >= 1 (its predecessor is "
            f"copied too){within}"
        )


class RegionFocusModule(nn.Module):
    """The Region Focus Module of a LLaVA-family ``model`` (``PyramidPruneModule`` in the reference), its decoder
    layers copied from ``model``'s layers ``[layers[0] - 1, *layers]`` (trainable; ``model``'s own untouched)."""

    def __init__(self, model: nn.Module, layers: Sequence[int]):
        super().__init__()
        adapter = get_adapter(model)
        if not isinstance(adapter, LlavaAdapter):
            raise ValueError(f"the Region Focus Module supports the LLaVA families, got {type(model).__name__}")
        layers = tuple(int(i) for i in layers)
        check_layers(layers, adapter.text_config.num_hidden_layers)
        self.adapter = adapter
        self.llm_layers = layers
        self.layers = nn.ModuleList(copy.deepcopy(adapter.layers[i]) for i in (layers[0] - 1, *layers))
        self.layers.requires_grad_(True)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        padding: torch.Tensor,
        queries: torch.Tensor,
        last_only: bool = False,
    ) -> list[torch.Tensor]:
        """The module's ``S_k`` (B, h, Q, N), raw fp32 logits of the rows ``queries`` (B, Q), for k = 0..K-1
        (``last_only``: ``S_{K-1}`` alone), from the LLM's input embeddings (B, N, C) with their positions
        (B, N) and ``padding`` (B, N) True at real tokens."""
        hidden = inputs_embeds
        rope = self.adapter.rotary(hidden, position_ids)
        mask = self.adapter.attention_mask(padding, padding.shape[1], hidden.dtype)
        K = len(self.llm_layers)
        out = []
        for k in range(K):
            hidden = self.layers[k](hidden, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            if not last_only or k == K - 1:
                out.append(attention_logits(self.adapter, self.layers[k + 1], hidden, rope, queries))
        return out

    def score(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        padding: torch.Tensor,
        last: torch.Tensor,
        vision_pos: torch.Tensor,
        vision_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Each vision token's score (B, V), fp32: the softmax, over the tokens at ``vision_pos`` (B, V) where
        ``vision_valid`` (B, V), of the last layer's logits of the last instruction token ``last`` (B,), averaged
        over heads (``get_text_image_attn``, inference). 0 where not valid."""
        logits = self(inputs_embeds, position_ids, padding, last[:, None], last_only=True)[0][:, :, 0]  # (B, h, N)
        cols = logits.gather(2, vision_pos[:, None, :].expand(-1, logits.shape[1], -1))  # (B, h, V)
        cols = cols.masked_fill(~vision_valid[:, None, :], float("-inf"))
        return torch.nan_to_num(cols.softmax(dim=-1)).mean(dim=1)


def region_focus_flops(
    text_config: PreTrainedConfig, num_layers: int, num_tokens: int, num_rows: int = 1, every_layer: bool = False
) -> int:
    """Matmul FLOPs of the module on one sample of ``num_tokens`` tokens: its layers ``0..K-1`` in full (K =
    ``num_layers``) and the logits of ``num_rows`` query rows in the last layer (``score``: one row), or with
    ``every_layer`` in each of the K layers (``RegionFocusModule.forward``, training)."""
    layer = sum(decoder_layer_flops(text_config, num_tokens).values())
    rows = attention_rows_flops(text_config, num_rows, num_tokens)
    return num_layers * layer + (num_layers if every_layer else 1) * rows


def distillation_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    rows: torch.Tensor,
    keys: torch.Tensor,
    image: torch.Tensor,
    skipped: Sequence[int] = SKIPPED_LAYERS,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """The reference's distillation loss (``Qwen2ForCausalLM.forward`` in its patched ``modeling_qwen2.py``), to
    be added to the language-model loss with weight 1: the plain mean, over samples with an image, layers ``k``
    not in ``skipped`` and heads, of three terms each: ``KL(softmax(T) || softmax(S))`` over the ``keys`` (B, N),
    ``KL(softmax(T / tau) || softmax(S / tau))`` over the ``image`` keys (B, N), both summed over the query rows
    and divided by their number (``batchmean``), and ``MSE(S / tau, T / tau)`` over rows x image keys.

    ``student``/``teacher``: per layer (B, h, Q, N) logits; ``rows`` (B, Q) marks each sample's real rows (the
    reference's: the token before each answer span). The reference masks no key, later ones included: its
    ``keys`` are every real token of the sample; its ``image`` keys the high-resolution image tokens."""
    return distillation_terms(student, teacher, rows, keys, image, skipped, temperature).mean()


def distillation_terms(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    rows: torch.Tensor,
    keys: torch.Tensor,
    image: torch.Tensor,
    skipped: Sequence[int] = SKIPPED_LAYERS,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """:func:`distillation_loss`'s three terms apart (3,): ``DISTILLATION_TERMS``, each the mean over samples with
    an image, layers not in ``skipped`` and heads. Each counts as many values as the others, so their mean is the
    loss."""
    terms = []
    for k, (S, T) in enumerate(zip(student, teacher, strict=True)):
        if k in skipped:
            continue
        S, T = S.float(), T.detach().float()
        row_mask = rows[:, None, :, None]  # (B, 1, Q, 1)
        n_rows = rows.sum(dim=1).clamp_min(1)[:, None]  # (B, 1)
        kl = _kl_rows(S, T, keys) * row_mask[..., 0]  # (B, h, Q)
        kl_img = _kl_rows(S / temperature, T / temperature, image) * row_mask[..., 0]
        sq = ((S - T) / temperature).square().masked_fill(~(row_mask & image[:, None, None, :]), 0.0)
        n_img = (n_rows * image.sum(dim=1)[:, None]).clamp_min(1)
        terms.append(torch.stack([kl.sum(-1) / n_rows, kl_img.sum(-1) / n_rows, sq.sum((-2, -1)) / n_img], -1))
    if not terms:
        raise ValueError(f"every layer of {len(student)} is skipped ({tuple(skipped)})")
    per_sample = torch.stack(terms, dim=1)  # (B, K', h, 3)
    present = image.any(dim=1) & rows.any(dim=1)  # (B,)
    return per_sample[present].mean((0, 1, 2)) if bool(present.any()) else per_sample.sum((0, 1, 2)) * 0.0


def _kl_rows(S: torch.Tensor, T: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(T) || softmax(S))`` per row (B, h, Q) over the keys where ``keys`` (B, N); 0 for a sample
    without any (its rows softmax over every key instead, so that no NaN reaches the backward pass)."""
    some = keys.any(dim=-1, keepdim=True)  # (B, 1)
    hidden = ~(keys | ~some)[:, None, None, :]
    log_s = S.masked_fill(hidden, float("-inf")).log_softmax(dim=-1)
    log_t = T.masked_fill(hidden, float("-inf")).log_softmax(dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(hidden, 0.0).sum(dim=-1)
    return kl * some[:, :, None]


def image_keys(adapter: LlavaAdapter, input_ids: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
    """The distillation's ``image`` keys (B, N): the vision tokens the module scores. On the tiled families those
    outside the base view (the tiles' tokens and their newlines: the reference's local slice, from the base view's
    end to the image's), on LLaVA-1.5 every vision token (its one view)."""
    vision = input_ids == adapter.model.config.image_token_id  # (B, N)
    if not adapter.tiled or not bool(vision.any()):
        return vision
    counts = vision.sum(dim=-1)  # (B,)
    kind = adapter.layout(input_ids.shape[0], image_sizes, int(counts.max())).kind.to(input_ids.device)  # (B, Nv)
    slot = (vision.long().cumsum(dim=-1) - 1).clamp(0, kind.shape[1] - 1)  # (B, N): each token's vision slot
    return vision & (kind.gather(1, slot) != BASE)


@dataclass
class DistillationOutput:
    loss: torch.Tensor  # the distillation loss: all the module's gradients come from it
    lm_loss: torch.Tensor  # the frozen LLM's language-model loss, detached (a constant to the module)
    terms: torch.Tensor  # (3,) DISTILLATION_TERMS, detached


class RegionFocusDistillation(nn.Module):
    """A Region Focus Module trained on a frozen LLaVA-family ``model`` (what ``train.stage: region_focus`` trains).

    One step is one forward of the frozen LLM (no gradient, ``output_hidden_states``: its LM loss, the merged input
    embeddings the module reads, and each layer's input for the teacher's logits), then the module's logits and
    :func:`distillation_loss` on the rows before each answer span (:func:`answer_rows`), the image keys those of
    :func:`image_keys`. The reference adds the LLM's LM loss to the distillation loss and trains both; with the LLM
    frozen the LM loss has no gradient, so ``loss`` is the distillation loss alone and the LM loss is reported.

    Of the module's last layer only what ``S_{K-1}`` reads is trainable (its ``input_layernorm``, ``q_proj`` and
    ``k_proj``): the rest never runs, keeps the LLM's values and takes no optimizer state."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        skipped: Sequence[int] = SKIPPED_LAYERS,
        temperature: float = TEMPERATURE,
    ):
        super().__init__()
        model.requires_grad_(False)
        self.model = model
        self.region_focus = RegionFocusModule(model, layers)
        last = self.region_focus.layers[-1]
        last.requires_grad_(False)
        for read in (last.input_layernorm, last.self_attn.q_proj, last.self_attn.k_proj):
            read.requires_grad_(True)
        self.skipped, self.temperature = tuple(skipped), temperature

    def train(self, mode: bool = True) -> RegionFocusDistillation:
        """The module in ``mode``; the frozen LLM stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
    ) -> DistillationOutput:
        """A collated training batch (right-padded (B, N) ``input_ids``, ``attention_mask``, ``labels``; the images'
        ``pixel_values`` and, for the tiled families, ``image_sizes``) to the loss and what to log."""
        adapter = self.region_focus.adapter
        padding = attention_mask.bool()
        position_ids = adapter.position_ids(input_ids, attention_mask, image_sizes)  # (B, N)
        images = {"pixel_values": pixel_values} | ({"image_sizes": image_sizes} if image_sizes is not None else {})
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                output_hidden_states=True,
                **images,
            )
        hidden = out.hidden_states  # index l: layer l's input; 0: the merged input embeddings (B, N, C)
        rows, real = answer_rows(labels, padding)  # (B, Q)
        teacher = teacher_logits(self.model, self.region_focus.llm_layers, hidden, position_ids, rows)
        student = self.region_focus(hidden[0], position_ids, padding, rows)
        image = image_keys(adapter, input_ids, image_sizes)
        terms = distillation_terms(student, teacher, real, padding, image, self.skipped, self.temperature)
        return DistillationOutput(terms.mean(), out.loss.detach(), terms.detach())


def save_region_focus(module: RegionFocusModule, directory: str | Path) -> Path:
    """Write ``module`` to ``directory`` (``region_focus.safetensors`` + ``region_focus.json``) and return it."""
    meta = {"method": "lrs_vqa", "layers": list(module.llm_layers), "model": model_signature(module.adapter.model)}
    return save_modules(module.layers, directory, (WEIGHTS_NAME, CONFIG_NAME), meta)


def region_focus_layers(directory: str | Path) -> tuple[int, ...]:
    """The ``layers`` of the Region Focus Module saved in ``directory``, read from its JSON alone (no model)."""
    path = Path(directory) / CONFIG_NAME
    try:
        return tuple(int(i) for i in json.loads(path.read_text())["layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileNotFoundError(f"{path}: not a saved Region Focus Module ({e})") from None


def load_region_focus(model: nn.Module, directory: str | Path) -> RegionFocusModule:
    """The Region Focus Module saved in ``directory``, for ``model`` (a base LLaVA, loaded as usual); fails naming
    the field when ``model`` is not the shape it was trained for."""
    keys = ("text_model_type", "hidden_size", "num_hidden_layers")
    meta, state = read_modules(model, directory, (WEIGHTS_NAME, CONFIG_NAME), "a Region Focus Module", keys)
    module = RegionFocusModule(model, meta["layers"])
    module.layers.load_state_dict(state, strict=True)
    return module
