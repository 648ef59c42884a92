"""Module trees of the SD1, SD2 and SDXL U-Nets and text encoders, full size and tiny, and tiny Flux.1 / SD3
transformers and pipelines, built in code.

Nothing here downloads a model. Full-size trees reproduce the layer names and weight shapes of the models
that kohya sd-scripts hands to a network module (docs/architecture.md §2, §6) and are meant to be built on the meta
device (`device="meta"`: no memory, a fraction of a second). Tiny trees have the same module names and the same
set of blocks with small widths, so they can be trained and run on a CPU in tests.

* SD1/SD2: diffusers `UNet2DConditionModel` (its names equal kohya's own SD1/SD2 U-Net).
* SDXL: `SdxlUNet`, written here with kohya's LDM names (`input_blocks.N.M`, `middle_block.N`,
  `output_blocks.N.M`, `time_embed`, `label_emb`, `out`) and class names `ResnetBlock2D`,
  `Transformer2DModel`, `Downsample2D`, `Upsample2D`, with a simple, real forward.
* Text encoders: transformers `CLIPTextModel` (SD1/SD2) or `[CLIPTextModel, CLIPTextModelWithProjection]`
  (SDXL).
* Flux.1 and SD3/SD3.5 (tiny only): diffusers `FluxTransformer2DModel` / `SD3Transformer2DModel` with the layer
  names of the published models, and whole `FluxPipeline` / `StableDiffusion3Pipeline`s (tiny CLIP, T5 and VAE,
  tokenizers built in memory) that generate a 32 px image in a fraction of a second. Full-size DiT layer names are
  in tests/data/kohya_manifests/diffusers_*.json.

diffusers and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from blora_tools.taxonomy.arch import Arch

SIZES = ("full", "tiny")

__all__ = [
    "SIZES",
    "SdxlConfig",
    "SDXL_FULL",
    "SDXL_TINY",
    "SdxlUNet",
    "ResnetBlock2D",
    "Transformer2DModel",
    "Downsample2D",
    "Upsample2D",
    "build_unet",
    "build_text_encoders",
    "build_tokenizer",
    "timestep_embedding",
    "FLUX_TINY",
    "SD3_TINY",
    "SD3_TINY_VARIANTS",
    "build_flux_transformer",
    "build_sd3_transformer",
    "build_t5_tokenizer",
    "build_flux_pipeline",
    "build_sd3_pipeline",
]


# --- helpers -----------------------------------------------------------------------------------------


def _check(arch: Arch | str, size: str) -> Arch:
    arch = Arch(arch)
    if arch not in (Arch.SD1, Arch.SD2, Arch.SDXL):
        raise ValueError(f"no model tree for architecture {arch.value!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    return arch


@contextlib.contextmanager
def _building(device: str | torch.device, seed: int) -> Iterator[None]:
    """Construct modules directly on `device` with a seeded global RNG; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            yield


# --- SD1 / SD2: diffusers UNet2DConditionModel --------------------------------------------------------

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def _sd_unet_config(arch: Arch, size: str, variant: str | None) -> dict:
    linear = arch is Arch.SD2 and variant != "ckpt"
    config = dict(
        in_channels=4,
        out_channels=4,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        layers_per_block=2,
        use_linear_projection=linear,
    )
    if size == "full":
        config.update(
            sample_size=64 if arch is Arch.SD1 else 96,
            block_out_channels=(320, 640, 1280, 1280),
            norm_num_groups=32,
            cross_attention_dim=768 if arch is Arch.SD1 else 1024,
            attention_head_dim=8 if arch is Arch.SD1 else (5, 10, 20, 20),
            upcast_attention=arch is Arch.SD2,
        )
    else:
        config.update(
            sample_size=16,
            block_out_channels=(32, 32, 64, 64),
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=2 if arch is Arch.SD1 else (2, 2, 4, 4),
        )
    return config


# --- SDXL: an LDM-named U-Net -------------------------------------------------------------------------


@dataclass(frozen=True)
class SdxlConfig:
    """The shape of an `SdxlUNet`. `depths[i]` is the transformer depth of level i (0 = no attention)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    depths: tuple[int, ...] = (0, 2, 10)
    head_dim: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816
    norm_groups: int = 32
    sample_size: int = 128

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


SDXL_FULL = SdxlConfig()
"""SDXL base: channels 320/640/1280, transformer depth 0/2/10, context 2048, adm_in 2816, head dim 64."""

SDXL_TINY = SdxlConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    depths=(0, 1, 2),
    head_dim=16,
    context_dim=80,  # the tiny te1 (32) and te2 (48) hidden states, concatenated like SDXL's 768 + 1280
    adm_in_channels=96,  # the tiny te2 projection (48) + 6 size conditions x 8, like SDXL's 1280 + 6 x 256
    norm_groups=8,
    sample_size=16,
)
"""A CPU-sized SDXL with the same module names and blocks (channels 32/64/64, transformer depth 0/1/2)."""


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding (cosines then sines), shape `[N, dim]`."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.reshape(-1).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResnetBlock2D(nn.Module):
    """LDM residual block: `in_layers`, `emb_layers`, `out_layers`, `skip_connection`."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=1e-5),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if in_channels == out_channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention with `to_q`, `to_k`, `to_v` and `to_out.0`."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b = x.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, x.shape[1], -1)
        for layer in self.to_out:
            out = layer(out)
        return out


class GEGLU(nn.Module):
    """Gated GELU projection (`proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """`net.0.proj` (GEGLU), `net.1` (dropout), `net.2` (output Linear)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention (`attn1`), cross-attention (`attn2`) and feed-forward (`ff`), each pre-normed."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer with linear projections: `norm`, `proj_in`, `transformer_blocks.K`, `proj_out`."""

    def __init__(self, channels: int, depth: int, context_dim: int, head_dim: int, groups: int):
        super().__init__()
        heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, context_dim, heads, head_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x)
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2) + residual


class Downsample2D(nn.Module):
    """Stride-2 3×3 convolution (`op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample2D(nn.Module):
    """Nearest ×2 upsampling followed by a 3×3 convolution (`conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SdxlUNet(nn.Module):
    """The SDXL U-Net with kohya's LDM module names. `forward(x, timesteps, context, y)` predicts noise."""

    def __init__(self, config: SdxlConfig = SDXL_FULL):
        super().__init__()
        self.config = config
        c = config
        mc, emb_dim, groups = c.model_channels, c.time_embed_dim, c.norm_groups
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.model_channels, self.context_dim, self.adm_in_channels = mc, c.context_dim, c.adm_in_channels

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )

        def transformer(ch: int, depth: int) -> Transformer2DModel:
            return Transformer2DModel(ch, depth, c.context_dim, c.head_dim, groups)

        levels = len(c.channel_mult)
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skips = [mc]
        ch = mc
        for level, mult in enumerate(c.channel_mult):
            for _ in range(2):
                layers: list[nn.Module] = [ResnetBlock2D(ch, mult * mc, emb_dim, groups)]
                ch = mult * mc
                if c.depths[level]:
                    layers.append(transformer(ch, c.depths[level]))
                self.input_blocks.append(nn.Sequential(*layers))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(nn.Sequential(Downsample2D(ch)))
                skips.append(ch)

        self.middle_block = nn.Sequential(
            ResnetBlock2D(ch, ch, emb_dim, groups),
            transformer(ch, c.depths[-1]),
            ResnetBlock2D(ch, ch, emb_dim, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = c.channel_mult[level] * mc
            for i in range(3):
                layers = [ResnetBlock2D(ch + skips.pop(), out_ch, emb_dim, groups)]
                ch = out_ch
                if c.depths[level]:
                    layers.append(transformer(ch, c.depths[level]))
                if level and i == 2:
                    layers.append(Upsample2D(ch))
                self.output_blocks.append(nn.Sequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch, eps=1e-5), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @staticmethod
    def _run(block: nn.Sequential, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in block:
            if isinstance(layer, ResnetBlock2D):
                h = layer(h, emb)
            elif isinstance(layer, Transformer2DModel):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Noise prediction for latents `x` `[N,C,H,W]` (H, W divisible by 4), text `context` `[N,L,context_dim]`,
        pooled/size conditioning `y` `[N,adm_in_channels]`."""
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(x.dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb, context)
        return self.out(h)


# --- public builders ----------------------------------------------------------------------------------


def build_unet(
    arch: Arch | str,
    size: str = "tiny",
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    variant: str | None = None,
) -> nn.Module:
    """Build the U-Net of `arch` at `size` ("full" or "tiny") on `device`, initialised from `seed`.

    SD1/SD2 give a diffusers `UNet2DConditionModel` (SD1.5 / SD2.1 config at full size); `variant="ckpt"`
    (SD2 only) gives the 1×1-conv `proj_in`/`proj_out` that kohya builds from a single-file SD2 checkpoint.
    SDXL gives an `SdxlUNet`. Build full size on `device="meta"` unless real weights are needed.
    """
    arch = _check(arch, size)
    if variant not in (None, "ckpt"):
        raise ValueError(f"unknown U-Net variant {variant!r} (known: 'ckpt')")
    if variant is not None and arch is not Arch.SD2:
        raise ValueError("the 'ckpt' variant exists only for SD2")
    if arch is Arch.SDXL:
        with _building(device, seed):
            return SdxlUNet(SDXL_FULL if size == "full" else SDXL_TINY)
    from diffusers import UNet2DConditionModel

    config = _sd_unet_config(arch, size, variant)
    with _building(device, seed):
        return UNet2DConditionModel(**config)


def _clip_config(hidden: int, layers: int, heads: int, mlp: int, act: str, vocab: int, projection: int | None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
    )
    if vocab < 49408:  # keep the special tokens inside a small vocabulary
        kwargs.update(pad_token_id=1, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    if projection is not None:
        kwargs["projection_dim"] = projection
    return CLIPTextConfig(**kwargs)


def _te_configs(arch: Arch, size: str) -> list[tuple[str, object]]:
    """(class name, config) per text encoder."""
    if size == "full":
        clip_l = _clip_config(768, 12, 12, 3072, "quick_gelu", 49408, 768)
        if arch is Arch.SD1:
            return [("CLIPTextModel", clip_l)]
        if arch is Arch.SD2:
            return [("CLIPTextModel", _clip_config(1024, 23, 16, 4096, "gelu", 49408, 512))]
        return [
            ("CLIPTextModel", clip_l),
            ("CLIPTextModelWithProjection", _clip_config(1280, 32, 20, 5120, "gelu", 49408, 1280)),
        ]
    tiny = _clip_config(32, 2, 4, 64, "quick_gelu", 1000, 32)
    if arch is Arch.SD1:
        return [("CLIPTextModel", tiny)]
    if arch is Arch.SD2:
        return [("CLIPTextModel", _clip_config(32, 2, 4, 64, "gelu", 1000, 32))]
    return [
        ("CLIPTextModel", tiny),
        ("CLIPTextModelWithProjection", _clip_config(48, 2, 4, 96, "gelu", 1000, 48)),
    ]


def build_text_encoders(
    arch: Arch | str,
    size: str = "tiny",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[nn.Module]:
    """Build the text encoder(s) of `arch`: `[CLIPTextModel]` for SD1/SD2, `[CLIPTextModel,
    CLIPTextModelWithProjection]` for SDXL. Full size matches CLIP-L / OpenCLIP-H (23 layers) / bigG."""
    arch = _check(arch, size)
    import transformers

    models: list[nn.Module] = []
    for i, (cls_name, config) in enumerate(_te_configs(arch, size)):
        cls = getattr(transformers, cls_name)
        with _building(device, seed + i):
            model = cls(config)
        models.append(model)
    return models


def build_tokenizer(folder, vocab_size: int = 1000):
    """A CLIP tokenizer with a small character vocabulary, written into `folder` (no download).

    Its ids fit a text encoder of `vocab_size` (the tiny ones: 1000; CLIP-L: 49408): the start and end tokens
    take the last two ids, as in CLIP.
    """
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


# --- Flux.1 and SD3 / SD3.5: tiny diffusers transformers and pipelines ---------------------------------

FLUX_TINY = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2, as Flux.1
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,  # the tiny T5's d_model
    pooled_projection_dim=32,  # the tiny CLIP-L's pooled output
    axes_dims_rope=(4, 14, 14),  # sums to the head dim
)
"""A CPU-sized FluxTransformer2DModel: hidden 64, 2 heads, 2 double + 2 single blocks (Flux.1: 3072, 24, 19 + 38)."""

SD3_TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=3,
    attention_head_dim=32,
    num_attention_heads=2,
    caption_projection_dim=64,  # the hidden width
    joint_attention_dim=96,  # the tiny T5's d_model, wider than CLIP-L + CLIP-G hidden (32 + 48) as in SD3
    pooled_projection_dim=80,  # CLIP-L + CLIP-G projections (32 + 48)
    pos_embed_max_size=16,
)
"""A CPU-sized SD3Transformer2DModel: hidden 64, 2 heads, 3 joint blocks (the last pre-only on the context)."""

SD3_TINY_VARIANTS = {
    "sd3_medium": {},
    "sd35_medium": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
    "sd35_large": dict(qk_norm="rms_norm"),
}
"""What the published SD3 models differ in, at the tiny size: q/k RMS norms (SD3.5) and `attn2` (SD3.5 Medium)."""

_DIT_VAE = {  # latent scaling and shift of the Flux.1 and SD3 VAEs
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
}
_T5_PIECES = "abcdefghijklmnopqrstuvwxyz0123456789"


def build_flux_transformer(device: str | torch.device = "cpu", seed: int = 0, *, variant: str = "dev") -> nn.Module:
    """A tiny diffusers `FluxTransformer2DModel` (`FLUX_TINY`); `variant="schnell"` has no guidance embedder."""
    from diffusers import FluxTransformer2DModel

    if variant not in ("dev", "schnell"):
        raise ValueError(f"unknown Flux variant {variant!r} (known: 'dev', 'schnell')")
    with _building(device, seed):
        return FluxTransformer2DModel(**FLUX_TINY, guidance_embeds=variant == "dev")


def build_sd3_transformer(
    device: str | torch.device = "cpu", seed: int = 0, *, variant: str = "sd35_medium"
) -> nn.Module:
    """A tiny diffusers `SD3Transformer2DModel` (`SD3_TINY`) shaped like one of `SD3_TINY_VARIANTS`."""
    from diffusers import SD3Transformer2DModel

    if variant not in SD3_TINY_VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r} (known: {', '.join(map(repr, SD3_TINY_VARIANTS))})")
    with _building(device, seed):
        return SD3Transformer2DModel(**SD3_TINY, **SD3_TINY_VARIANTS[variant])


def build_t5_tokenizer():
    """A T5 tokenizer (`<pad>` 0, `</s>` 1, `<unk>` 2) over lower-case letters and digits, built in memory."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -3.0) for ch in _T5_PIECES] + [("▁" + ch, -2.5) for ch in _T5_PIECES]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _tiny_t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=128, d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def _tiny_dit_vae(family: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **_DIT_VAE[family],
    )


def _clip_tokenizer():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return build_tokenizer(folder)


def build_flux_pipeline(seed: int = 0, *, variant: str = "dev"):
    """A tiny diffusers `FluxPipeline`: `build_flux_transformer`, a tiny CLIP-L (`CLIPTextModel`, hidden 32), a
    one-layer T5 (d_model 32), a two-level VAE with 16 latent channels and Flux's flow-matching scheduler.

    Images must be multiples of 4 px (VAE factor 2, 2x2 packing); 32 px with 2 steps takes about 0.1 s on one CPU
    thread. Every model is in eval mode. Deterministic from `seed`; nothing is downloaded.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    transformer = build_flux_transformer(seed=seed, variant=variant)
    with _building("cpu", seed + 1):
        text_encoder = CLIPTextModel(_clip_config(32, 2, 4, 64, "quick_gelu", 1000, 32))
        text_encoder_2 = _tiny_t5(FLUX_TINY["joint_attention_dim"])
        vae = _tiny_dit_vae("flux")
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                        tokenizer=_clip_tokenizer(), text_encoder_2=text_encoder_2.eval(),
                        tokenizer_2=build_t5_tokenizer(), transformer=transformer.eval())


def build_sd3_pipeline(seed: int = 0, *, variant: str = "sd35_medium"):
    """A tiny diffusers `StableDiffusion3Pipeline`: `build_sd3_transformer`, tiny CLIP-L and CLIP-G
    (`CLIPTextModelWithProjection`, hidden 32 and 48), a one-layer T5 (d_model 96), a two-level VAE with 16 latent
    channels and SD3's flow-matching scheduler (shift 3).

    Images must be multiples of 4 px (VAE factor 2, patch 2) and at most 32 px (`pos_embed_max_size` 16); 32 px with
    2 steps takes about 0.1 s on one CPU thread. Every model is in eval mode. Deterministic from `seed`; nothing is
    downloaded.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = build_sd3_transformer(seed=seed, variant=variant)
    with _building("cpu", seed + 1):
        clip_l = CLIPTextModelWithProjection(_clip_config(32, 2, 4, 64, "quick_gelu", 1000, 32))
        clip_g = CLIPTextModelWithProjection(_clip_config(48, 2, 4, 96, "gelu", 1000, 48))
        t5 = _tiny_t5(SD3_TINY["joint_attention_dim"])
        vae = _tiny_dit_vae("sd3")
    tokenizer = _clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=clip_l.eval(), tokenizer=tokenizer, text_encoder_2=clip_g.eval(), tokenizer_2=tokenizer,
        text_encoder_3=t5.eval(), tokenizer_3=build_t5_tokenizer(),
    )
