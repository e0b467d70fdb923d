"""Tiny LLaVA and Qwen-VL builders: a small CLIP tower, projector and Llama built from configs, with an offline
processor; tiny LLaVA-NeXT / OneVision and Qwen2-VL / Qwen2.5-VL / Qwen3-VL configs.

Tests use them with random weights; the toy world (``pipelines.toy``) trains one. Everything here is built
locally: no hub access. The shapes follow Hugging Face's own LLaVA tester (hidden sizes of a few dozen).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# Qwen-VL's: its image, video and vision-span tokens at the ids of QWEN_VL_TOKENS, and its chat turns' delimiters.
QWEN_SPECIAL_TOKENS = (*SPECIAL_TOKENS[:4], "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
QWEN_SPECIAL_TOKENS += ("<|im_start|>", "<|im_end|>")
# Words of the LLaVA-1.5 (vicuna_v1) template, so that prompts built for the real model tokenize here too.
TEMPLATE_WORDS = (
    "a chat between curious human and an artificial intelligence assistant . the gives helpful , detailed , "
    "polite answers to the 's questions user : assistant answer the question using a single word or phrase ? yes no"
).split()


def build_tokenizer(words: Iterable[str] = (), qwen: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the template words plus ``words`` (lower-cased, punctuation split off); with
    ``qwen``, Qwen-VL's special tokens (:data:`QWEN_SPECIAL_TOKENS`: ``<|image_pad|>`` the image token,
    ``<|im_end|>`` the end of sequence, as Qwen2.5-VL-Instruct's)."""
    vocab: dict[str, int] = {}
    specials = QWEN_SPECIAL_TOKENS if qwen else SPECIAL_TOKENS
    for token in (*specials, *TEMPLATE_WORDS, *(w.lower() for w in words)):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(  # a BOS token in front, as Llama's tokenizer does
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>" if qwen else "</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>" if qwen else "<image>"},
    )
    if qwen:  # whole tokens before the word split, at their vocabulary ids
        tokenizer.add_tokens(list(QWEN_SPECIAL_TOKENS[5:]), special_tokens=True)
    tokenizer.padding_side = "left"  # generation pads on the left; training collators choose their own
    return tokenizer


def tiny_llava_config(
    vocab_size: int = 128,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 128,
    image_token_id: int = SPECIAL_TOKENS.index("<image>"),
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP tower (penultimate layer, CLS dropped), 2-layer GELU projector, Llama.

    ``initializer_range`` is the std of the Llama's and the projector's initial weights (Hugging Face's 0.02
    suits widths in the thousands; a model trained from scratch at a width of ~100 learns faster near
    ``hidden_size ** -0.5``). The CLIP tower scales its own initialisation by its width.
    """
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )


def fitting_tokenizer(config: PreTrainedConfig, words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """:func:`build_tokenizer` over ``words`` (Qwen-VL's special tokens for its configs), checked to fit
    ``config``'s vocabulary."""
    tokenizer = build_tokenizer(words, qwen=isinstance(config, (Qwen2VLConfig, Qwen2_5_VLConfig)))
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but text_config.vocab_size is {config.text_config.vocab_size}"
        )
    return tokenizer


# A vicuna_v1-like chat template for the tiny tiled processors (llava-v1.6-vicuna's shape: the image first, each
# assistant turn closed by </s>), so that prompts are the processor's own, as for the real checkpoints.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{{ '</s>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# Qwen2.5-VL-Instruct's chat template without its default system prompt: each turn "<|im_start|>{role}\n...
# <|im_end|>\n", an image as "<|vision_start|><|image_pad|><|vision_end|>" before the text.
TINY_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ImageQwenVLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images only: transformers' video processors need torchvision, which the project
    does not install, and a processor cannot be built without one. Prompts, image expansion and outputs are
    ``Qwen2_5_VLProcessor``'s (images at their own resolution, ``pixel_values`` (P, D), ``image_grid_thw``)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = tokenizer.image_token, "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_processor(
    config: LlavaConfig | LlavaNextConfig | Qwen2_5_VLConfig,
    words: Iterable[str] = (),
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ProcessorMixin:
    """The processor of a tiny config, whose tokenizer covers ``words``: a ``LlavaProcessor`` (CLIP normalization,
    square resize) for LLaVA-1.5, a ``LlavaNextProcessor`` (its tiles, grid and feature selection, with
    :data:`TINY_CHAT_TEMPLATE`) for LLaVA-NeXT, an :class:`ImageQwenVLProcessor` (Qwen2-VL's image processor:
    images resized to multiples of ``patch_size * 2`` with ``min_pixels`` to ``max_pixels`` pixels, default 2 x 2
    to 8 x 8 merged tokens; :data:`TINY_QWEN_CHAT_TEMPLATE`) for Qwen-VL."""
    tokenizer = fitting_tokenizer(config, words)
    if isinstance(config, (Qwen2VLConfig, Qwen2_5_VLConfig)):
        vision = config.vision_config
        token = vision.patch_size * vision.spatial_merge_size  # pixels of one merged token's side
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            min_pixels=min_pixels or (2 * token) ** 2,
            max_pixels=max_pixels or (8 * token) ** 2,
        )
        return ImageQwenVLProcessor(image_processor, tokenizer, chat_template=TINY_QWEN_CHAT_TEMPLATE)
    size = config.vision_config.image_size
    square = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    common = {
        "tokenizer": tokenizer,
        "patch_size": config.vision_config.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,  # CLIP's CLS token, dropped by the "default" feature selection
    }
    if isinstance(config, LlavaNextConfig):
        image_processor = LlavaNextImageProcessorPil(**square, image_grid_pinpoints=config.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=image_processor, chat_template=TINY_CHAT_TEMPLATE, **common)
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(**square), **common)


DECODER_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
MODEL_CLASSES = {
    LlavaConfig: LlavaForConditionalGeneration,
    LlavaNextConfig: LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig: LlavaOnevisionForConditionalGeneration,
    Qwen2VLConfig: Qwen2VLForConditionalGeneration,
    Qwen2_5_VLConfig: Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig: Qwen3VLForConditionalGeneration,
}


def tiny_tiled_config(
    family: str = "llava_next",
    decoder: str = "llama",
    vocab_size: int = 128,
    tile_size: int = 16,
    patch_size: int = 4,
    grid: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2)),
    vision_hidden: int = 32,
    vision_layers: int = 2,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
    image_token_id: int = SPECIAL_TOKENS.index("<image>"),
    vision_aspect_ratio: str = "anyres_max_9",
) -> LlavaNextConfig | LlavaOnevisionConfig:
    """A tiny anyres config: ``family`` ``llava_next`` (CLIP tower, penultimate layer, CLS dropped, as
    llava-v1.6) or ``llava_onevision`` (SigLIP tower, last layer, every token, as llava-onevision), tiles of
    ``tile_size`` pixels, ``grid`` the (rows, columns) of tiles an image may be cut into, and a ``decoder`` of
    ``llama``, ``mistral`` (no sliding window, as llava-v1.6-mistral) or ``qwen2`` (q/k/v biases). The sizes mean
    what they mean in :func:`tiny_llava_config` (``intermediate_size`` None: twice the hidden size)."""
    vision_kwargs = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": max(1, vision_hidden // 16),
        "image_size": tile_size,
        "patch_size": patch_size,
    }
    text = DECODER_CONFIGS[decoder](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        tie_word_embeddings=False,
        **({"sliding_window": None} if decoder == "mistral" else {}),
    )
    pinpoints = [[rows * tile_size, cols * tile_size] for rows, cols in grid]
    if family == "llava_next":
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision_kwargs, projection_dim=vision_hidden),
            text_config=text,
            image_token_id=image_token_id,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision_kwargs),
            text_config=text,
            image_token_id=image_token_id,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=vision_aspect_ratio,
        )
    raise ValueError(f"unknown tiled family {family!r}; choose 'llava_next' or 'llava_onevision'")


# Qwen-VL's special tokens in the tiny vocabulary: <|image_pad|> is the LLaVA image token's id.
QWEN_VL_TOKENS = {"image": SPECIAL_TOKENS.index("<image>"), "video": 5, "vision_start": 6, "vision_end": 7}


def tiny_qwen_vl_config(
    family: str = "qwen2_vl",
    vocab_size: int = 128,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
) -> Qwen2VLConfig | Qwen2_5_VLConfig | Qwen3VLConfig:
    """A tiny Qwen-VL config, as transformers' own Qwen2-VL / Qwen2.5-VL / Qwen3-VL testers build them: ``family``
    ``qwen2_vl`` (a ViT with a 2 x 2 ``PatchMerger``), ``qwen2_5_vl`` (window attention over 4 x 4 merged
    tokens, the last block full) or ``qwen3_vl`` (full attention, a learned 4 x 4 position grid resampled to each
    image, every block feeding a DeepStack merger: decoder layers 0 .. ``vision_layers`` - 1 get DeepStack features,
    and a Qwen3 decoder with q/k norms and interleaved M-RoPE), patches of ``patch_size`` pixels, 2 frames per
    temporal patch, and a decoder with M-RoPE (``mrope_section`` splits the head's half-width into temporal, height
    and width frequencies). The image token ids are :data:`QWEN_VL_TOKENS`."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
        "pad_token_id": SPECIAL_TOKENS.index("<pad>"),
        "bos_token_id": SPECIAL_TOKENS.index("<s>"),
        "eos_token_id": SPECIAL_TOKENS.index("</s>"),
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": vision_layers,
        "num_heads": max(1, vision_hidden // 16),
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": initializer_range,
    }
    tokens = {f"{name}_token_id": token for name, token in QWEN_VL_TOKENS.items()}
    if family == "qwen2_vl":
        vision |= {"embed_dim": vision_hidden, "hidden_size": hidden_size, "mlp_ratio": 2}
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    if family == "qwen2_5_vl":
        vision |= {
            "hidden_size": vision_hidden,
            "out_hidden_size": hidden_size,
            "intermediate_size": 2 * vision_hidden,
            "window_size": 4 * patch_size * 2,
            "fullatt_block_indexes": [vision_layers - 1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    if family == "qwen3_vl":
        text["head_dim"] = hidden_size // num_heads
        text["rope_parameters"] |= {"mrope_interleaved": True}
        vision |= {
            "hidden_size": vision_hidden,
            "out_hidden_size": hidden_size,
            "intermediate_size": 2 * vision_hidden,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": list(range(vision_layers)),
        }
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    raise ValueError(f"unknown Qwen-VL family {family!r}; choose 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl'")


def tiny_llava(config: PreTrainedConfig | None = None, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised tiny LLaVA (``LlavaForConditionalGeneration``, or the LLaVA-NeXT / OneVision /
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL class for their configs) in eval mode (fp32)."""
    import torch

    config = config or tiny_llava_config()
    torch.manual_seed(seed)
    model = MODEL_CLASSES[type(config)]._from_config(config, attn_implementation=attn_implementation)
    return model.eval()
