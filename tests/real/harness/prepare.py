"""Write what a real kohya trainer run reads: tokenizer folders, a tiny random model, a captioned image set.

    python prepare.py --arch sd1|sdxl --out DIR

Runs under the harness interpreter (requirements.txt), not the project's. It writes
  DIR/tokenizers/<model id with "/" -> "_">/   for the trainer's --tokenizer_cache_dir
  DIR/model/                                   a diffusers folder (StableDiffusion[XL]Pipeline.save_pretrained)
  DIR/model/unet/config.json                   also read by launch.py to size kohya's own U-Net
  DIR/data/img/NNN.png + .txt, DIR/data/dataset.toml   for --dataset_config

The tiny models keep the real module layout (block types, layers per block, SDXL's transformer depths 1/2/10), so
every LoRA module name and kohya block index is the real one; only the widths shrink. SDXL's text encoders keep
their real widths (768 and 1280, concatenated into kohya's hard-coded 2048-wide context) and text encoder 1 keeps
11 layers, because kohya reads its hidden_states[11]. Everything is seeded.

The tokenizer is the project's tiny character-level CLIP tokenizer (blora_tools.models.build_tokenizer; this
repository is on PYTHONPATH). kohya only needs a CLIPTokenizer it can load offline, not the real vocabulary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOKENIZER_IDS = {  # the model ids kohya's tokenize strategies look up under --tokenizer_cache_dir
    "clip_l": "openai_clip-vit-large-patch14",
    "clip_g": "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
}
VOCAB = 1000  # the tiny tokenizer's ids fit a text encoder of this size
IMAGES, IMAGE_SIZE = 4, 128  # at 64 px SD1's mid-block attention sees one token and its q/k gradients are 0


def write_tokenizers(folder: Path) -> None:
    """The project's tiny character-level CLIP tokenizer, saved under each model id kohya looks up."""
    from blora_tools.models import build_tokenizer

    for model_id in TOKENIZER_IDS.values():
        build_tokenizer(folder / model_id, VOCAB).save_pretrained(str(folder / model_id))


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


BUILDERS = {"sd1": build_sd1, "sdxl": build_sdxl}


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
