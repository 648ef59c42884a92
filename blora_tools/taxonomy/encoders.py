"""Text encoders as the trainers build them: which component each is, and the real shape of every layer.

CLIP encoders (transformers `CLIPTextModel` names) serve every family; T5-XXL (transformers `T5EncoderModel`,
v1.1 gated-GELU) is the third encoder of Flux.1 and SD3. kohya names them `lora_te_` (SD1/SD2's only one),
`lora_te1_`/`lora_te2_` (SDXL's, SD3's CLIP-L and CLIP-G) and `lora_te3_` (T5; sd-scripts `lora_flux`
`LORA_PREFIX_TEXT_ENCODER_T5`, `lora_sd3`), the component value after `lora_`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from blora_tools.names import Named


class Component(Named):
    """Which network a module belongs to; also the kohya key prefix after `lora_`."""

    UNET = "unet"
    """The denoiser: the U-Net of SD1/SD2/SDXL, the transformer of Flux.1 and SD3 (kohya keeps `lora_unet_`)."""
    TE = "te"
    TE1 = "te1"
    TE2 = "te2"
    TE3 = "te3"


@dataclass(frozen=True)
class TextEncoder:
    """A CLIP text encoder as the kohya trainer builds it (transformers `CLIPTextModel` names)."""

    component: Component
    width: int
    depth: int
    mlp_width: int
    projection: int | None = None
    """`text_projection` output width (SDXL's and SD3's second encoder; a layer outside `text_model`)."""
    vocabulary: int = 49408
    positions: int = 77


@dataclass(frozen=True)
class T5Encoder:
    """A T5 v1.1 encoder (gated-GELU feed-forward) as transformers' `T5EncoderModel` names it."""

    component: Component
    width: int = 4096
    depth: int = 24
    heads: int = 64
    head_width: int = 64
    mlp_width: int = 10240
    vocabulary: int = 32128
    buckets: int = 32
    """relative-attention buckets (the first block's `relative_attention_bias` embedding)."""


Encoder = TextEncoder | T5Encoder

_TEXT_MODEL = "text_model."
T5_PATH_ROOTS = ("encoder.block.", "encoder.final_layer_norm", "shared")
"""How a T5 encoder's module paths begin, which no CLIP path does (CLIP: `text_model.`, or `encoder.layers.`)."""


def is_t5_path(path: str) -> bool:
    """Whether a dotted text-encoder module path is a T5 encoder's."""
    return path.startswith(T5_PATH_ROOTS)


def encoder_layer_shapes(encoders: Iterable[Encoder]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(kohya stem, weight shape) of every layer of each encoder, CLIP paths with and without transformers 4's
    `text_model` level."""
    for encoder in encoders:
        prefix = f"lora_{encoder.component.value}_"
        if isinstance(encoder, T5Encoder):
            for path, shape in _t5_layers(encoder):
                yield prefix + path.replace(".", "_"), shape
            continue
        for path, shape in _clip_layers(encoder):
            yield prefix + path.replace(".", "_"), shape
            if path.startswith(_TEXT_MODEL):  # transformers 5 dropped the `text_model` level
                yield prefix + path[len(_TEXT_MODEL) :].replace(".", "_"), shape


def _clip_layers(te: TextEncoder) -> Iterator[tuple[str, tuple[int, ...]]]:
    w = te.width
    yield "text_model.embeddings.token_embedding", (te.vocabulary, w)
    yield "text_model.embeddings.position_embedding", (te.positions, w)
    for i in range(te.depth):
        layer = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"{layer}.self_attn.{proj}", (w, w)
        yield f"{layer}.layer_norm1", (w,)
        yield f"{layer}.layer_norm2", (w,)
        yield f"{layer}.mlp.fc1", (te.mlp_width, w)
        yield f"{layer}.mlp.fc2", (w, te.mlp_width)
    yield "text_model.final_layer_norm", (w,)
    if te.projection is not None:
        yield "text_projection", (te.projection, w)


def _t5_layers(t5: T5Encoder) -> Iterator[tuple[str, tuple[int, ...]]]:
    w, inner = t5.width, t5.heads * t5.head_width
    yield "shared", (t5.vocabulary, w)
    for i in range(t5.depth):
        block = f"encoder.block.{i}"
        for proj in ("q", "k", "v"):
            yield f"{block}.layer.0.SelfAttention.{proj}", (inner, w)
        yield f"{block}.layer.0.SelfAttention.o", (w, inner)
        if i == 0:
            yield f"{block}.layer.0.SelfAttention.relative_attention_bias", (t5.buckets, t5.heads)
        yield f"{block}.layer.0.layer_norm", (w,)
        yield f"{block}.layer.1.DenseReluDense.wi_0", (t5.mlp_width, w)
        yield f"{block}.layer.1.DenseReluDense.wi_1", (t5.mlp_width, w)
        yield f"{block}.layer.1.DenseReluDense.wo", (w, t5.mlp_width)
        yield f"{block}.layer.1.layer_norm", (w,)
    yield "encoder.final_layer_norm", (w,)
