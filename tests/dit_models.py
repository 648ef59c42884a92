"""Tiny Flux.1 and SD3 models shaped like sd-scripts' own classes, for tests that cannot import sd-scripts.

kohya's `networks.lora_flux` / `lora_sd3` choose layers by the class NAME of their parent block and the class name
`Linear` / `Conv2d` of each layer, and name a module by its attribute path. So these fixtures keep exactly the class
names and attribute paths of sd-scripts (commit 48d368f) `library/flux_models.py` (`Flux`, `DoubleStreamBlock`,
`SingleStreamBlock`, `SelfAttention.qkv/.norm/.proj`, `Modulation.lin`, `MLPEmbedder.in_layer/out_layer`,
`LastLayer`) and `library/sd3_models.py` (`MMDiT`, `MMDiTBlock`, `SingleDiTBlock`, `AttentionLinears.qkv/.proj`,
`attn2` in the chosen x-blocks, `MLP.fc1/fc2`, `adaLN_modulation.1`, the pre-only last context block, `PatchEmbed`,
`TimestepEmbedding`, `Embedder`, `UnPatch`), at small widths. The forward passes are simplified (no RoPE, no
position interpolation) but every layer takes part, so a LoRA on any of them gets a gradient and a loss falls.
tests/plugin/test_fake_trainer_dit.py checks the names against the golden lora_flux / lora_sd3 manifests, and
`tests/real/test_dit_sd_scripts.py` against kohya's own `create_network` on models built by sd-scripts.

Text encoders are tiny transformers models of the classes kohya targets (`CLIPAttention`, `CLIPMLP`,
`T5Attention`, `T5DenseGatedActDense`), in the trainers' order: Flux `[clip_l, t5xxl]`, SD3 `[clip_l, clip_g, t5xxl]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

TEXT_WIDTH = 32
"""CLIP width and pooled width of the tiny text encoders, and T5's d_model."""
VOCAB = 1000


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Joint attention over the token axis; q/k/v are (B, L, D)."""
    b, n, d = q.shape
    split = [t.view(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, d)


# --- Flux.1 (sd-scripts library/flux_models.py) -------------------------------------------------------------


@dataclass(frozen=True)
class FluxSize:
    """A tiny Flux: the real block counts by default (kohya's block indices are absolute), small widths."""

    double_blocks: int = 19
    single_blocks: int = 38
    hidden: int = 32
    heads: int = 2
    mlp_ratio: float = 4.0
    in_channels: int = 16
    guidance: bool = True  # FLUX.1-dev has guidance_in, schnell does not


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.lin.out_features // self.lin.in_features, dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


def _heads_normed(qkv: torch.Tensor, norm: QKNorm, heads: int) -> tuple[torch.Tensor, ...]:
    q, k, v = qkv.chunk(3, dim=-1)
    b, n, d = q.shape

    def normed(t, rms):
        return rms(t.view(b, n, heads, d // heads)).reshape(b, n, d)

    return normed(q, norm.query_norm), normed(k, norm.key_norm), v


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        mlp = int(hidden * mlp_ratio)
        self.heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden, heads))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"),
                                                          nn.Linear(mlp, hidden)))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mods, qkvs = {}, {}
        for name, x in (("img", img), ("txt", txt)):
            mods[name] = getattr(self, f"{name}_mod")(vec)
            shift, scale = mods[name][0], mods[name][1]
            attn = getattr(self, f"{name}_attn")
            qkvs[name] = _heads_normed(attn.qkv((1 + scale) * getattr(self, f"{name}_norm1")(x) + shift),
                                       attn.norm, self.heads)
        joint = _attention(*(torch.cat([qkvs["txt"][i], qkvs["img"][i]], dim=1) for i in range(3)), self.heads)
        out = {"txt": joint[:, : txt.shape[1]], "img": joint[:, txt.shape[1]:]}
        results = []
        for name, x in (("img", img), ("txt", txt)):
            _, _, gate1, shift2, scale2, gate2 = mods[name]
            x = x + gate1 * getattr(self, f"{name}_attn").proj(out[name])
            x = x + gate2 * getattr(self, f"{name}_mlp")((1 + scale2) * getattr(self, f"{name}_norm2")(x) + shift2)
            results.append(x)
        return results[0], results[1]


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden, self.heads, self.mlp_hidden = hidden, heads, int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)  # q | k | v | mlp-in, fused
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)  # attn ‖ mlp -> out
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden, self.mlp_hidden], dim=-1)
        attn = _attention(*_heads_normed(qkv, self.norm, self.heads), self.heads)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    """`forward(img, txt, timesteps, y, guidance)`: img (B, L, in_channels) packed latents, txt (B, T, 32) T5
    states, y (B, 32) pooled CLIP-L; returns the prediction for the img tokens."""

    def __init__(self, size: FluxSize = FluxSize()):
        super().__init__()
        h = size.hidden
        self.size = size
        self.img_in = nn.Linear(size.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(TEXT_WIDTH, h)
        self.guidance_in = MLPEmbedder(256, h) if size.guidance else nn.Identity()
        self.txt_in = nn.Linear(TEXT_WIDTH, h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, size.heads, size.mlp_ratio) for _ in range(size.double_blocks))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, size.heads, size.mlp_ratio) for _ in range(size.single_blocks))
        self.final_layer = LastLayer(h, size.in_channels)

    def forward(self, img, txt, timesteps, y, guidance=None):
        vec = self.time_in(timestep_embedding(timesteps)) + self.vector_in(y)
        if self.size.guidance:
            vec = vec + self.guidance_in(timestep_embedding(guidance if guidance is not None else timesteps * 0 + 1))
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# --- SD3 / SD3.5 MMDiT (sd-scripts library/sd3_models.py) ----------------------------------------------------


@dataclass(frozen=True)
class MMDiTSize:
    """A tiny MMDiT. kohya's sets hidden = 64 × depth; the fixture does not need to. `attn2_blocks`: the x-blocks
    with SD3.5 Medium's second self-attention."""

    depth: int = 3
    hidden: int = 32
    heads: int = 2
    attn2_blocks: tuple[int, ...] = (0,)
    latent_channels: int = 16
    patch: int = 2
    grid: int = 8


class AttentionLinears(nn.Module):
    def __init__(self, dim: int, pre_only: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)  # kohya: RMSNorm over a head (qk_norm="rms") or Identity
        self.ln_k = nn.LayerNorm(dim, eps=1e-6)

    def qkv_normed(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.ln_q(q), self.ln_k(k), v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SingleDiTBlock(nn.Module):
    """One stream of a joint block. Modulation chunks: 2 (pre-only), 6, or 9 with attn2 (as kohya)."""

    def __init__(self, dim: int, pre_only: bool = False, attn2: bool = False):
        super().__init__()
        self.pre_only, self.has_attn2 = pre_only, attn2
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = AttentionLinears(dim, pre_only)
        if attn2:
            self.attn2 = AttentionLinears(dim, False)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(dim, 4 * dim)
        chunks = 2 if pre_only else (9 if attn2 else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def mods(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation(c)[:, None, :].chunk(self.adaLN_modulation[1].out_features // c.shape[-1], -1)

    def post(self, x: torch.Tensor, attn: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = x + mods[2] * self.attn.proj(attn)
        return x + mods[5] * self.mlp((1 + mods[4]) * self.norm2(x) + mods[3])


class MMDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, pre_only: bool, attn2: bool):
        super().__init__()
        self.heads = heads
        self.context_block = SingleDiTBlock(dim, pre_only=pre_only)
        self.x_block = SingleDiTBlock(dim, attn2=attn2)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        cm, xm = self.context_block.mods(c), self.x_block.mods(c)
        cq = self.context_block.attn.qkv_normed((1 + cm[1]) * self.context_block.norm1(context) + cm[0])
        xn = (1 + xm[1]) * self.x_block.norm1(x) + xm[0]
        xq = self.x_block.attn.qkv_normed(xn)
        joint = _attention(*(torch.cat([cq[i], xq[i]], dim=1) for i in range(3)), self.heads)
        c_attn, x_attn = joint[:, : context.shape[1]], joint[:, context.shape[1]:]
        if self.x_block.has_attn2:
            x_attn2 = _attention(*self.x_block.attn2.qkv_normed((1 + xm[7]) * self.x_block.norm1(x) + xm[6]),
                                 self.heads)
            x = x + xm[8] * self.x_block.attn2.proj(x_attn2)
        x = self.x_block.post(x, x_attn, xm)
        context = None if self.context_block.pre_only else self.context_block.post(context, c_attn, cm)
        return context, x


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))


class Embedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class UnPatch(nn.Module):
    def __init__(self, dim: int, patch: int, channels: int):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, side: int) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        x = self.linear((1 + scale) * self.norm_final(x) + shift)
        b, p, ch = x.shape[0], self.patch, self.channels
        x = x.view(b, side, side, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, ch, side * p, side * p)


class MMDiT(nn.Module):
    """`forward(x, t, y, context)`: x (B, 16, H, W) latents, y (B, 2·32) pooled CLIP-L ‖ CLIP-G, context
    (B, T, 32) text states; returns a prediction shaped like x."""

    def __init__(self, size: MMDiTSize = MMDiTSize()):
        super().__init__()
        h = size.hidden
        self.size = size
        self.x_embedder = PatchEmbed(size.latent_channels, h, size.patch)
        self.t_embedder = TimestepEmbedding(h)
        self.y_embedder = Embedder(2 * TEXT_WIDTH, h)
        self.context_embedder = nn.Linear(TEXT_WIDTH, h)
        self.pos_embed = nn.Parameter(torch.randn(1, size.grid * size.grid, h) * 0.02, requires_grad=False)
        self.joint_blocks = nn.ModuleList(
            MMDiTBlock(h, size.heads, pre_only=i == size.depth - 1, attn2=i in size.attn2_blocks)
            for i in range(size.depth))
        self.final_layer = UnPatch(h, size.patch, size.latent_channels)

    def forward(self, x, t, y, context):
        side = x.shape[-1] // self.size.patch
        x = self.x_embedder(x) + self.pos_embed[:, : side * side]
        c = self.t_embedder.mlp(timestep_embedding(t)) + self.y_embedder.mlp(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, x = block(context, x, c)
        return self.final_layer(x, c, side)


# --- text encoders -------------------------------------------------------------------------------------------


def _clip(projection: bool, seed: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=TEXT_WIDTH, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                            pad_token_id=VOCAB - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(seed: int) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=TEXT_WIDTH, d_kv=16, d_ff=2 * TEXT_WIDTH, num_layers=2,
                      num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config)


def flux_text_encoders(seed: int = 0) -> list[nn.Module]:
    """`[clip_l, t5xxl]`, as FluxNetworkTrainer.load_target_model returns them."""
    return [_clip(False, seed), _t5(seed + 1)]


def sd3_text_encoders(seed: int = 0) -> list[nn.Module]:
    """`[clip_l, clip_g, t5xxl]`, as Sd3NetworkTrainer.load_target_model returns them (both CLIPs projected)."""
    return [_clip(True, seed), _clip(True, seed + 1), _t5(seed + 2)]


def transformer(arch: str, seed: int = 0, **size) -> nn.Module:
    """The Flux or MMDiT fixture alone, deterministic for a seed; `size` overrides FluxSize / MMDiTSize fields."""
    torch.manual_seed(seed + 10)
    if arch == "flux":
        return Flux(FluxSize(**size)).eval()
    if arch == "sd3":
        return MMDiT(MMDiTSize(**size)).eval()
    raise ValueError(f"unknown DiT arch {arch!r}")


def build(arch: str, seed: int = 0, **size) -> tuple[list[nn.Module], nn.Module]:
    """Text encoders and transformer of `arch` ("flux" or "sd3"), deterministic for a seed, in eval mode."""
    model = transformer(arch, seed, **size)
    tes = flux_text_encoders(seed) if arch == "flux" else sd3_text_encoders(seed)
    for m in tes:
        m.eval()
    return tes, model
