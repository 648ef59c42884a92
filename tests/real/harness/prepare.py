"""Write what a real kohya trainer run reads: tokenizer folders, a tiny random model, a captioned image set.

    python prepare.py --arch sd1|sdxl|flux|sd3 --out DIR

Runs under the harness interpreter (requirements.txt), not the project's. It writes
  DIR/tokenizers/<model id with "/" -> "_">/   for the trainer's --tokenizer_cache_dir
  DIR/model/                                   SD1/SDXL: a diffusers folder (StableDiffusion[XL]Pipeline.save_pretrained)
  DIR/model/unet/config.json                   also read by launch.py to size kohya's own U-Net
  DIR/model/{flux,sd3}.safetensors, ...        Flux/SD3: the files of DIT_FILES, and DIR/model/tiny.json with the
                                               sizes that launch.py gives the configs sd-scripts hard-codes
  DIR/data/img/NNN.png + .txt, DIR/data/dataset.toml   for --dataset_config

The tiny models keep the real module layout (block types, layers per block, SDXL's transformer depths 1/2/10), so
every LoRA module name and kohya block index is the real one; only the widths shrink. SDXL's text encoders keep
their real widths (768 and 1280, concatenated into kohya's hard-coded 2048-wide context) and text encoder 1 keeps
11 layers, because kohya reads its hidden_states[11]. Everything is seeded.

Flux and SD3 are built by sd-scripts' own classes (library.flux_models / library.sd3_models; SD_SCRIPTS is on
PYTHONPATH), so their checkpoints have exactly the keys kohya's loaders expect. Flux keeps the real 19 double and 38
single blocks at hidden 64 (2 heads, RoPE axes [4, 14, 14]); SD3 cannot keep its depth, because kohya's MMDiT sets
hidden = 64 x depth: depth 4 (hidden 256), RMS q/k norm and attn2 in blocks 0-1 as in SD3.5 Medium. The text
encoders are tiny transformers models saved with save_pretrained; launch.py replaces kohya's text-encoder loaders
(which hard-code the full configs) with loaders of these folders.

The tokenizers are the project's tiny character-level CLIP tokenizer (blora_tools.models.build_tokenizer; this
repository is on PYTHONPATH) and a character-level T5 tokenizer built here with the `tokenizers` library. kohya
only needs tokenizers it can load offline, not the real vocabularies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOKENIZER_IDS = {  # the model ids kohya's tokenize strategies look up under --tokenizer_cache_dir
    "clip_l": "openai_clip-vit-large-patch14",
    "clip_g": "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "t5xxl": "google_t5-v1_1-xxl",
}
T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!"
DIT_FILES = {  # what launch.py and the trainer flags (harness TRAINERS) read in DIR/model
    "flux": {"model": "flux.safetensors", "ae": "ae.safetensors", "clip_l": "clip_l", "t5xxl": "t5xxl"},
    "sd3": {"model": "sd3.safetensors", "vae": "vae.safetensors", "clip_l": "clip_l", "clip_g": "clip_g",
            "t5xxl": "t5xxl"},
}
VOCAB = 1000  # the tiny tokenizer's ids fit a text encoder of this size
IMAGES, IMAGE_SIZE = 4, 128  # at 64 px SD1's mid-block attention sees one token and its q/k gradients are 0


def write_tokenizers(folder: Path) -> None:
    """The project's tiny character-level CLIP tokenizer under each CLIP id kohya looks up, and the T5 one."""
    from blora_tools.models import build_tokenizer

    for name, model_id in TOKENIZER_IDS.items():
        if name != "t5xxl":
            build_tokenizer(folder / model_id, VOCAB).save_pretrained(str(folder / model_id))
    write_t5_tokenizer(folder / TOKENIZER_IDS["t5xxl"])


def write_t5_tokenizer(folder: Path) -> None:
    """A T5TokenizerFast with one token per lower-cased character, T5's <pad>=0, </s>=1, <unk>=2 and no extra ids."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(T5_CHARACTERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0).save_pretrained(str(folder))


def load_t5_tokenizer(folder: Path):
    """Load the folder as kohya does and check that it splits a caption into its characters and ends it."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    ids = tokenizer("A cat").input_ids
    if ids != [vocab["a"], vocab["c"], vocab["a"], vocab["t"], tokenizer.eos_token_id]:
        raise SystemExit(f"{folder}: T5 tokenizer self-check failed, {ids}")
    return tokenizer


def load_tokenizer(folder: Path):
    """Load the folder as kohya does and check that it splits a word into its characters."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    ids = tokenizer("a cat").input_ids
    expected = [tokenizer.bos_token_id, vocab["a</w>"], vocab["c"], vocab["a"], vocab["t</w>"], tokenizer.eos_token_id]
    if ids != expected or tokenizer.model_max_length != 77:
        raise SystemExit(f"{folder}: tokenizer self-check failed, {ids} != {expected}")
    return tokenizer


def clip_config(tokenizer, hidden: int, layers: int, heads: int, mlp: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    # four levels: latents are 1/8 of the image with 4 channels, as in SD
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def build_sd1(tokenizers: Path, out: Path) -> None:
    """SD1 layout at widths (32, 64, 64, 64); a 2-layer, 32-wide text encoder is the cross-attention context."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer(tokenizers / TOKENIZER_IDS["clip_l"])
    width = 32
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=width)
    text_encoder = CLIPTextModel(clip_config(tokenizer, width, 2, 4, 2 * width))
    StableDiffusionPipeline(vae=tiny_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(out))


def build_sdxl(tokenizers: Path, out: Path) -> None:
    """SDXL layout at widths (32, 64, 128), 64-wide heads as kohya's SDXL U-Net assumes, real text-encoder widths."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer1 = load_tokenizer(tokenizers / TOKENIZER_IDS["clip_l"])
    tokenizer2 = load_tokenizer(tokenizers / TOKENIZER_IDS["clip_g"])
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 128), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 1, 2), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    text_encoder1 = CLIPTextModel(clip_config(tokenizer1, 768, 11, 12, 32))
    text_encoder2 = CLIPTextModelWithProjection(clip_config(tokenizer2, 1280, 2, 20, 32))
    StableDiffusionXLPipeline(vae=tiny_vae(0.13025), text_encoder=text_encoder1, text_encoder_2=text_encoder2,
                              tokenizer=tokenizer1, tokenizer_2=tokenizer2, unet=unet,
                              scheduler=scheduler()).save_pretrained(str(out))


def _save_tensors(state: dict, path: Path) -> None:
    """A state dict as one safetensors file: fp32, contiguous, every value finite."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"{path}: non-finite values in {bad[:3]}")
    save_file(state, str(path))


def t5_encoder(vocab: int, width: int):
    """A tiny T5 encoder with T5 v1.1's gated-GELU feed-forward (kohya's TE LoRA targets T5DenseGatedActDense)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=16, d_ff=32, num_layers=2, num_heads=2,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False))


def build_flux(tokenizers: Path, out: Path) -> None:
    """FLUX.1-dev: sd-scripts' own Flux and AutoEncoder at the sizes of tiny_dit.py (BFL key names), a 2-layer
    CLIP-L and a 2-layer T5 at the Flux text widths."""
    from library import flux_models
    from transformers import CLIPTextModel

    from tiny_dit import FLUX_AE_PARAMS, FLUX_PARAMS, TEXT_WIDTH

    files = DIT_FILES["flux"]
    out.mkdir(parents=True)
    _save_tensors(flux_models.Flux(flux_models.FluxParams(**FLUX_PARAMS)).state_dict(), out / files["model"])
    _save_tensors(flux_models.AutoEncoder(flux_models.AutoEncoderParams(**FLUX_AE_PARAMS)).state_dict(),
                  out / files["ae"])
    clip_tokenizer = load_tokenizer(tokenizers / TOKENIZER_IDS["clip_l"])
    CLIPTextModel(clip_config(clip_tokenizer, TEXT_WIDTH, 2, 2, 2 * TEXT_WIDTH)).save_pretrained(out / files["clip_l"])
    t5_vocab = len(load_t5_tokenizer(tokenizers / TOKENIZER_IDS["t5xxl"]))
    t5_encoder(t5_vocab, TEXT_WIDTH).save_pretrained(out / files["t5xxl"])


def build_sd3(tokenizers: Path, out: Path) -> None:
    """SD3.5-Medium layout: sd-scripts' own MMDiT (kohya infers its sizes from the keys, saved under
    `model.diffusion_model.` as in the released files) and a tiny SDVAE; 2-layer projected CLIP-L and CLIP-G, and a
    2-layer T5 at kohya's hard-coded context width 4096."""
    import numpy as np
    import torch
    from library import sd3_models, sd3_utils
    from transformers import CLIPTextModelWithProjection

    from tiny_dit import SD3_ATTN2_BLOCKS, SD3_CLIP_WIDTHS, SD3_DEPTH, SD3_POS_GRID, SD3_T5_WIDTH, tiny_sdvae

    files = DIT_FILES["sd3"]
    out.mkdir(parents=True)
    hidden = 64 * SD3_DEPTH
    params = sd3_models.SD3Params(
        patch_size=2, depth=SD3_DEPTH, num_patches=SD3_POS_GRID**2, pos_embed_max_size=SD3_POS_GRID,
        adm_in_channels=sum(SD3_CLIP_WIDTHS.values()), qk_norm="rms", x_block_self_attn_layers=SD3_ATTN2_BLOCKS,
        context_embedder_in_features=SD3_T5_WIDTH, context_embedder_out_features=hidden, model_type="5-medium")
    mmdit = sd3_models.create_sd3_mmdit(params)
    # the constructor leaves pos_embed and the q/k RMSNorm scales uninitialised (torch.empty)
    grid = np.asarray(sd3_models.get_2d_sincos_pos_embed(hidden, SD3_POS_GRID), dtype=np.float32)
    mmdit.pos_embed.copy_(torch.from_numpy(grid).unsqueeze(0))
    for module in mmdit.modules():
        if isinstance(module, sd3_models.RMSNorm) and module.weight is not None:
            torch.nn.init.ones_(module.weight)
    state = {"model.diffusion_model." + k: v for k, v in mmdit.state_dict().items()}
    _save_tensors(state, out / files["model"])
    inferred = sd3_utils.analyze_state_dict_state(dict(mmdit.state_dict()))
    if (inferred.depth, inferred.x_block_self_attn_layers) != (SD3_DEPTH, SD3_ATTN2_BLOCKS):
        raise SystemExit(f"kohya reads the tiny MMDiT as {inferred}")
    _save_tensors(tiny_sdvae().state_dict(), out / files["vae"])
    for name, width in SD3_CLIP_WIDTHS.items():
        tokenizer = load_tokenizer(tokenizers / TOKENIZER_IDS[name])
        config = clip_config(tokenizer, width, 2, 2, 2 * width)
        config.hidden_act = "quick_gelu" if name == "clip_l" else "gelu"
        CLIPTextModelWithProjection(config).save_pretrained(out / files[name])
    t5_vocab = len(load_t5_tokenizer(tokenizers / TOKENIZER_IDS["t5xxl"]))
    t5_encoder(t5_vocab, SD3_T5_WIDTH).save_pretrained(out / files["t5xxl"])


BUILDERS = {"sd1": build_sd1, "sdxl": build_sdxl, "flux": build_flux, "sd3": build_sd3}


def write_dataset(out: Path) -> None:
    """Coloured shapes on random backgrounds with captions, and the --dataset_config that lists them."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    images = out / "img"
    images.mkdir(parents=True)
    for i, (colour, rgb) in enumerate(list(colours.items())[:IMAGES]):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(rng.randrange(256) for _ in range(3)))
        r = IMAGE_SIZE // 4
        x, y = rng.randint(r, IMAGE_SIZE - r), rng.randint(r, IMAGE_SIZE - r)
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=rgb)
        image.save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"a {colour} circle")
    (out / "dataset.toml").write_text(
        "[general]\nshuffle_caption = false\ncaption_extension = \".txt\"\n\n"
        f"[[datasets]]\nresolution = {IMAGE_SIZE}\nbatch_size = 1\nenable_bucket = false\n\n"
        f"  [[datasets.subsets]]\n  image_dir = {json.dumps(str(images.resolve()))}\n  num_repeats = 1\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(BUILDERS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    tokenizers = args.out / "tokenizers"
    write_tokenizers(tokenizers)
    BUILDERS[args.arch](tokenizers, args.out / "model")
    write_dataset(args.out / "data")
    print(f"tiny {args.arch} model, tokenizers and {IMAGES} images written to {args.out}")


if __name__ == "__main__":
    main()
