"""What a pruning stage sees: the public input of every policy (``StageInput``), and the token bookkeeping the
engine keeps between stages (``TokenSequence``).

Shapes: B batch, N0 tokens of the prompt, N tokens still in the sequence, Nv vision tokens per sample, V vision
tokens still kept, T text (non-vision) tokens (padding included, masked), Q queries, h heads, C hidden size; at the
vision tower: M = 1 + P tower tokens (CLS, then the P patches), d its width.

A stage after decoder layer ``-1`` is the vision-tower stage: it acts on the projector's output, before decoder
layer 0, and may read the tower's attention (``StageInput.vision_attention``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lvpruning.layout import VisionLayout


def keep_count(ratio: float, num_vision: int) -> int:
    """Vision tokens kept at a stage with keep ratio ``ratio`` (rounded down, at least one)."""
    return max(1, math.floor(ratio * num_vision + 1e-6))


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden`` (B, N, C) at the positions ``index`` (B, K) -> (B, K, C)."""
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def split_tokens(vision: torch.Tensor, num_vision: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the text tokens (B, N - V) and of the vision tokens (B, V), each in sequence order.

    A stable sort of the vision mask keeps shapes static (no ``nonzero``), so this also runs on ``meta``."""
    order = torch.argsort(vision.to(torch.int8), dim=1, stable=True)
    split = vision.shape[1] - num_vision
    return order[:, :split], order[:, split:]


@dataclass
class TokenSequence:
    """The tokens of one segment (the layers between two stages), gathered from the original sequence."""

    hidden: torch.Tensor  # (B, N, C)
    index: torch.Tensor  # (B, N) original positions
    padding: torch.Tensor  # (B, N) bool, True on real tokens
    position_ids: torch.Tensor  # (B, N), or (3, B, N) for Qwen-VL's M-RoPE: tokens on the last axis
    vision: torch.Tensor  # (B, N) bool
    instruction: torch.Tensor  # (B, N) bool
    # Qwen3-VL's DeepStack features (L, B, N, C), added to the hidden states after decoder layers 0 .. L - 1
    # (0 off the vision tokens); None on the other families and once the last of those layers has run
    deepstack: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> TokenSequence:
        """Keep the positions ``index`` (B, N') of this sequence, in order (each keeps its position id and its
        DeepStack features)."""
        fields = (self.index, self.padding, self.vision, self.instruction)
        index_, padding, vision, instruction = (t.gather(1, index) for t in fields)
        position_ids = self.position_ids.gather(-1, index.expand(*self.position_ids.shape[:-2], -1, -1))
        deepstack = self.deepstack
        if deepstack is not None:
            deepstack = deepstack.gather(
                2, index[None, ..., None].expand(deepstack.shape[0], -1, -1, deepstack.shape[-1])
            )
        hidden = gather_tokens(self.hidden, index)
        return TokenSequence(hidden, index_, padding, position_ids, vision, instruction, deepstack)

    def add_deepstack(self, layer: int) -> None:
        """After decoder layer ``layer``: add its DeepStack features to the hidden states, as HF's
        ``Qwen3VLTextModel._deepstack_process`` does at the vision positions (in the hidden states' dtype); nothing
        past the DeepStack layers or on the other families."""
        if self.deepstack is None or layer >= self.deepstack.shape[0]:
            return
        self.hidden = self.hidden + self.deepstack[layer].to(self.hidden.dtype)
        if layer == self.deepstack.shape[0] - 1:
            self.deepstack = None  # no later layer reads them


@dataclass(frozen=True)
class LayerRecord:
    """A decoder layer's sub-blocks, recorded for a policy that asked (``PruningPolicy.recorded_layers``).

    ``attn_in``/``mlp_in`` are the normed inputs of the attention and MLP sub-blocks (the outputs of
    ``input_layernorm`` and ``post_attention_layernorm``), ``attn_out``/``mlp_out`` their outputs before the residual
    adds; all (B, N, C) over the tokens the layer saw."""

    layer: int
    attn_in: torch.Tensor
    attn_out: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    padding: torch.Tensor  # (B, N) bool
    vision: torch.Tensor  # (B, N) bool
    instruction: torch.Tensor  # (B, N) bool


@dataclass(frozen=True)
class StageShape:
    """The sizes a policy's FLOPs overhead depends on, at one stage (or one recorded layer) of a prefill."""

    stage: int  # index in the schedule (for a recorded layer: the stage it precedes)
    layer: int  # the decoder layer
    num_tokens: int  # N, the sequence the layer sees
    num_vision: int  # V, vision tokens in it
    num_text: int  # T
    kept: int = 0  # k, the vision tokens the stage keeps
    # the vision-tower stage on LLaVA-NeXT: per tower pass (base view, then each tile) the patches that reach the
    # decoder (after HF's unpadding), and the newline tokens; () and 0 for LLaVA-1.5's single pass
    tower_passes: tuple[int, ...] = ()
    newlines: int = 0


@dataclass(frozen=True)
class MergePlan:
    """A stage's outcome: the vision tokens kept and, for a merging ("recycling") method, their new hidden states.

    ``keep`` (B, k) indexes the stage's V vision tokens (``StageInput.vision_pos``), in any order; every kept token
    keeps its original position (eq. 14), so a token built from several (a merge, or an aggregate of dropped tokens
    placed at a representative) takes the position of the token whose slot it fills. ``hidden`` (B, k, C), in
    ``keep``'s order, replaces the kept tokens' hidden states (the stage layer's output); ``None`` keeps them.
    ``values`` (B, k), optional, are per-token values that later stages of the same prefill read back with
    ``StageInput.recorded(layer)``, ``layer`` this stage's, like a recorded layer's."""

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass(frozen=True)
class StageInput:
    """Everything a policy may read at one stage. The policy returns keep scores (B, V) for the vision tokens at
    ``vision_pos``, and the engine keeps the top-k, or a :class:`MergePlan`.

    ``records`` maps each recorded layer to what the policy's ``observe`` returned for it, (B, N0) per original
    position (read-only). ``attention(queries)`` recomputes the stage layer's attention rows of chosen queries from
    ``hidden_in`` with the model's own weights (no switch to eager attention); ``next_attention(queries)`` those of
    the following layer from ``hidden_out``, for a method that ranks by the attention of the layer it prunes
    before.

    At the vision-tower stage (``layer == -1``) ``hidden_in`` and ``hidden_out`` are both the embeddings (the
    projector's output in the vision slots), ``attention`` does not exist, and the tower is readable:
    ``vision_states`` are its hidden states (``vision_states[l]`` is the input of encoder layer ``l``, CLS
    included, which LLaVA's feature selection drops), ``vision_attention(l, queries)`` recomputes encoder layer
    ``l``'s attention rows, ``vision_keys(l)`` its keys, ``project`` is LLaVA's projector (tower features to the
    decoder's width) and ``feature_layer`` the encoder layer whose output LLaVA projects (22 of 24 in LLaVA-1.5).
    Vision token ``j`` of the image (``vision_index``) is tower token ``j + 1``.

    On LLaVA-NeXT the tower runs once per tile (pass 0 the base view, pass 1 + t tile t): ``vision_states`` are
    then (B, P, M, C_v) (P the batch's most passes; a sample's missing passes are zero), ``vision_attention(l,
    queries)`` takes queries (B, P, Q) (or ``None``) and returns (B, P, h_v, Q, M), ``vision_keys(l)`` is
    (B, P, h_v, M, d_v), and ``tower_pass`` / ``tower_token`` (B, Nv) give each vision token's pass and tower token
    (-1 for the newline tokens, which have none, and empty slots); on LLaVA-1.5 they are 0 and ``j + 1``.

    On Qwen-VL (``merge_unit`` 4) the tower has no CLS token and runs once per sample: ``vision_states[l]``
    (B, P, C_v) is block ``l``'s input over the sample's patches in the processor's order (zero beyond its own),
    ``vision_attention(l, queries)`` (B, h_v, Q, P) is restricted to what the block computes (its image, Qwen2.5-VL's
    window blocks their window), ``feature_layer`` is the last block (its output feeds the merger), vision token ``j``
    is patches ``4j .. 4j + 3``, and ``project`` is the ``PatchMerger`` on merged tokens' features (B, n, 4 C_v) (its
    input, the 4 patches side by side).

    Samples may have different numbers of vision tokens (LLaVA-NeXT, LLaVA-OneVision): a sample's slots beyond its
    own are padding (``vision_valid``), and the engine never keeps them; ``layout`` says, per vision token, whether
    it is the base view, a tile (which, and its row and column) or a grid row's newline token."""

    stage: int  # index in the schedule
    layer: int  # the decoder layer after which this stage prunes (zero-based)
    hidden_in: torch.Tensor  # (B, N, C) the layer's input
    hidden_out: torch.Tensor  # (B, N, C) the layer's output (Qwen3-VL: DeepStack added, the next layer's input)
    text_pos: torch.Tensor  # (B, T) positions of the text tokens, padding included
    vision_pos: torch.Tensor  # (B, V) positions of the kept vision tokens
    vision_index: torch.Tensor  # (B, V) index of each kept vision token among the image's Nv (0..Nv-1)
    num_vision: int  # Nv, vision slots per sample (the batch's largest count)
    vision_counts: torch.Tensor  # (B,) each sample's own number of vision tokens n_b
    layout: VisionLayout  # (B, Nv) where each vision token comes from: base view, tile (row, col) or newline
    keep_counts: tuple[int, ...]  # k_b, the vision tokens each sample keeps at this stage (its first k_b of keep)
    token_index: torch.Tensor  # (B, N) original position of each token
    instruction: torch.Tensor  # (B, N) bool, the instruction tokens that guide pruning
    padding: torch.Tensor  # (B, N) bool, True on real tokens
    position_ids: torch.Tensor  # (B, N), or (3, B, N) on Qwen-VL (M-RoPE: temporal, height, width)
    input_ids: torch.Tensor  # (B, N0) the prompt (``input_ids.gather(1, token_index)``: the tokens at this stage)
    pixel_values: torch.Tensor  # (B, 3, H, W); (B, tiles, 3, H, W) tiled; (B, patches, D) Qwen-VL, zero-padded
    records: Mapping[int, torch.Tensor]
    # queries (B, Q) -> the softmax attention (B, h, Q, N) that those tokens pay every token in this stage's layer,
    # 0 on padding keys and on later (causal) keys
    attention: Callable[[torch.Tensor], torch.Tensor]
    # the same for the next layer, from ``hidden_out``: the attention it would pay before this stage prunes
    next_attention: Callable[[torch.Tensor], torch.Tensor]
    # the vision-tower stage only: the tower's hidden states, each (B, M, C_v), and
    # (layer, queries (B, Q) tower tokens, or None for all M) -> the softmax attention (B, h_v, Q, M) of that layer
    vision_states: tuple[torch.Tensor, ...] | None = None
    vision_attention: Callable[[int, torch.Tensor | None], torch.Tensor] | None = None
    vision_keys: Callable[[int], torch.Tensor] | None = None  # layer -> (B, h_v, M, d_v)
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # (B, n, C_v) -> (B, n, C)
    feature_layer: int | None = None
    tower_pass: torch.Tensor | None = None  # (B, Nv) each vision token's tower pass, -1: none
    tower_token: torch.Tensor | None = None  # (B, Nv) its token in that pass (CLS 0), -1: none
    layout_host: VisionLayout | None = None  # ``layout`` on the CPU, for plans that branch on it (also on meta)
    # Qwen-VL's vision-tower stage: patches per vision token (the 2 x 2 merger's 4); None on a tower with a CLS token
    merge_unit: int | None = None

    def vision_valid(self) -> torch.Tensor:
        """(B, V) True on the vision tokens still in play: False on a sample's empty slots (fewer vision tokens than
        the batch's largest) and on tokens an earlier stage dropped for that sample only (it keeps fewer)."""
        return self.padding.gather(1, self.vision_pos)

    def kept_layout(self) -> VisionLayout:
        """The layout of the kept vision tokens, (B, V)."""
        return self.layout.gather(self.vision_index)

    def text_mask(self) -> torch.Tensor:
        """(B, T) True where ``text_pos`` holds an instruction token (not padding, not a supervised answer)."""
        return self.instruction.gather(1, self.text_pos)

    def after_image(self) -> torch.Tensor:
        """(B, T) True where ``text_pos`` holds an instruction token that follows the image (the question)."""
        last_vision = self.vision_pos.max(dim=1, keepdim=True).values  # (B, 1)
        return self.text_mask() & (self.text_pos > last_vision)

    def last_instruction(self) -> torch.Tensor:
        """(B, 1) position of each sample's last instruction token (the last prompt token in generation)."""
        positions = torch.arange(self.instruction.shape[1], device=self.instruction.device)
        return (self.instruction * positions).argmax(dim=1, keepdim=True)

    def recorded(self, layer: int) -> torch.Tensor:
        """What ``observe`` returned for ``layer``, at the kept vision tokens: (B, V)."""
        return self.records[layer].gather(1, self.token_index.gather(1, self.vision_pos))
