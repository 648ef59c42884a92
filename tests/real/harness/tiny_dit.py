"""The sizes of the tiny Flux.1 and SD3 models, shared by prepare.py (which builds them) and launch.py (which gives
them to the sd-scripts configs that hard-code the full sizes). Runs under the harness interpreter, sd-scripts on
sys.path.

Facts used (sd-scripts 48d368f): `library/flux_models.py` `FluxParams` / `AutoEncoderParams` and `configs`;
`library/flux_utils.py` `load_flow_model` reads only the block counts and dev/schnell from the checkpoint;
`library/sd3_utils.py` `analyze_state_dict_state` reads every MMDiT size from the checkpoint (depth = width / 64);
`library/sd3_models.py` `SDVAE` builds `VAEEncoder` / `VAEDecoder` with their default (full) widths.
"""

from __future__ import annotations

TEXT_WIDTH = 32
"""Flux: the CLIP-L pooled width (vec_in_dim) and the T5 width (context_in_dim)."""

FLUX_PARAMS = dict(
    in_channels=64,  # 16 latent channels x 2x2 packing, fixed by the AE
    vec_in_dim=TEXT_WIDTH, context_in_dim=TEXT_WIDTH,
    hidden_size=64, mlp_ratio=4.0, num_heads=2,
    depth=19, depth_single_blocks=38,  # the real block counts: kohya's block indices stay the real ones
    axes_dim=[4, 14, 14],  # sums to the head width 32, each even (RoPE)
    theta=10_000, qkv_bias=True, guidance_embed=True,  # FLUX.1-dev
)
FLUX_AE_PARAMS = dict(
    resolution=256, in_channels=3, out_ch=3, z_channels=16, scale_factor=0.3611, shift_factor=0.1159,
    ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1,  # 4 levels keep latents at 1/8; GroupNorm(32) needs ch % 32 == 0
)

SD3_DEPTH = 4
"""kohya's MMDiT: hidden = 64 x depth, heads = depth; the last block's context stream is pre-only."""
SD3_ATTN2_BLOCKS = [0, 1]
"""x-blocks with SD3.5 Medium's second self-attention (with RMS q/k norm: kohya's model type "5-medium")."""
SD3_POS_GRID = 32
"""Position-embedding grid: latents up to 32 x 2 patches = 512 px."""
SD3_CLIP_WIDTHS = {"clip_l": 32, "clip_g": 64}
"""Hidden and projection widths; y_embedder takes both pooled outputs, the context pads them to T5's 4096."""
SD3_T5_WIDTH = 4096
"""library/strategy_sd3.py pads the CLIP states to 4096 and zero-fills a missing T5 output at 4096."""
SD3_VAE = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def tiny_sdvae(dtype=None, device=None):
    """sd-scripts' SDVAE with tiny encoder/decoder widths (its constructor hard-codes the full ones)."""
    import torch
    from library import sd3_models

    class SDVAE(sd3_models.SDVAE):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.encoder = sd3_models.VAEEncoder(dtype=dtype or torch.float32, device=device, **SD3_VAE)
            self.decoder = sd3_models.VAEDecoder(dtype=dtype or torch.float32, device=device, **SD3_VAE)

    return SDVAE()
