"""A stand-in for sd-scripts' `train_network.py`: the network-module calls in the trainer's order (docs/architecture.md §4).

It replays what the real trainer does with `--network_module` — import by name, `--base_weights` merges,
`create_network` or (with `--dim_from_weights`) `create_network_from_weights`, `prepare_network`, `apply_to`,
`load_weights`, `enable_gradient_checkpointing`, `prepare_optimizer_params` (3-argument form, falling back to 2
on TypeError), `prepare_grad_etc`, then per epoch `on_epoch_start` and per step `on_step_start`, loss, backward,
gradient all-reduce (distributed), `get_trainable_params` for clipping, optimizer step,
`apply_max_norm_regularization`, and finally `save_weights` with kohya-like metadata — on tiny models and a
fixed synthetic batch, on the CPU. The loss is a plain noise-prediction MSE; no scheduler, no VAE.

Flux.1 and SD3 (`flux_train_network.py` / `sd3_train_network.py`, sd-scripts 48d368f) differ where the network sees
it: the text encoders arrive as a list (`[clip_l, t5xxl]`, `[clip_l, clip_g, t5xxl]`); `post_process_network`
reads `network.train_t5xxl` (an AttributeError without it) and refuses it with `cache_text_encoder_outputs`; the
text-encoder train flags are `[clip, t5xxl]` / `[clip, clip, t5xxl]`; `prepare_optimizer_params_with_multiple_te_lrs`
is used when the network has it, with the text-encoder learning rate as a list; and a batch with
diff-output-preservation items predicts its prior with `set_multiplier(0.0)`, then calls `set_multiplier(1.0)`.
The models are the sd-scripts-shaped fixtures of `dit_models.py`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import dit_models
from blora_tools.models import build_text_encoders, build_unet

SEQ_LEN = 8
LATENT = 8
DIT_ARCHS = ("flux", "sd3")


def tiny_models(arch: str, seed: int = 0, **dit_size) -> tuple[list[nn.Module], nn.Module]:
    """Tiny text encoder(s) and U-Net (Flux/SD3: transformer) of `arch`, deterministic for a seed; `dit_size`
    overrides fields of dit_models.FluxSize / MMDiTSize."""
    if arch in DIT_ARCHS:
        return dit_models.build(arch, seed, **dit_size)
    tes = build_text_encoders(arch, "tiny", "cpu", seed)
    unet = build_unet(arch, "tiny", "cpu", seed)
    for model in (*tes, unet):
        model.eval()
    return tes, unet


def text_encoder_arg(arch: str, tes: list[nn.Module]):
    """What the trainer hands the network module: one model for SD1/SD2, the list for SDXL, Flux and SD3."""
    return tes if arch in ("sdxl", *DIT_ARCHS) else tes[0]


def text_encoder_train_flags(arch: str, train_text_encoder: bool, train_t5xxl: bool) -> list[bool]:
    """Which text encoders the trainer trains: `get_text_encoders_train_flags` of each trainer."""
    if arch == "flux":
        return [train_text_encoder, train_t5xxl]
    if arch == "sd3":
        return [train_text_encoder, train_text_encoder, train_t5xxl]
    return [train_text_encoder] * (2 if arch == "sdxl" else 1)


def synthetic_batch(arch: str, batch_size: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed batch: token ids, latents, noise and timesteps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 990, (batch_size, SEQ_LEN), generator=g)
    ids[:, -1] = 999  # the tiny CLIP's eos token
    if arch == "flux":  # packed latents: (B, tokens, channels)
        shape = (batch_size, LATENT * LATENT // 4, dit_models.FluxSize.in_channels)
    elif arch == "sd3":
        shape = (batch_size, dit_models.MMDiTSize.latent_channels, LATENT, LATENT)
    else:
        shape = (batch_size, 4, LATENT, LATENT)
    return {
        "input_ids": ids,
        "latents": torch.randn(shape, generator=g),
        "noise": torch.randn(shape, generator=g),
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=g),
    }


def predict(arch: str, tes: list[nn.Module], unet: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The U-Net's noise prediction for the batch, conditioned through the text encoder(s)."""
    noisy = batch["latents"] + 0.5 * batch["noise"]
    if arch == "flux":
        pooled = tes[0](batch["input_ids"]).pooler_output
        t5 = tes[1](batch["input_ids"]).last_hidden_state
        return unet(noisy, t5, batch["timesteps"], pooled)
    if arch == "sd3":
        clip_l = tes[0](batch["input_ids"], output_hidden_states=True)
        clip_g = tes[1](batch["input_ids"], output_hidden_states=True)
        t5 = tes[2](batch["input_ids"]).last_hidden_state
        context = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2], t5], dim=1)
        return unet(noisy, batch["timesteps"], torch.cat([clip_l.text_embeds, clip_g.text_embeds], -1), context)
    if arch == "sdxl":
        out1 = tes[0](batch["input_ids"])
        out2 = tes[1](batch["input_ids"])
        context = torch.cat([out1.last_hidden_state, out2.last_hidden_state], dim=-1)
        pooled = out2.text_embeds
        y = torch.cat([pooled, torch.zeros(pooled.shape[0], unet.adm_in_channels - pooled.shape[1])], dim=-1)
        return unet(noisy, batch["timesteps"], context, y)
    context = tes[0](batch["input_ids"]).last_hidden_state
    return unet(noisy, batch["timesteps"], context).sample


def loss_of(arch: str, tes, unet, batch, target: torch.Tensor | None = None) -> torch.Tensor:
    return F.mse_loss(predict(arch, tes, unet, batch), batch["noise"] if target is None else target)


def preserved_target(network: nn.Module, arch: str, tes, unet, batch) -> torch.Tensor:
    """Diff output preservation (the DiT trainers' get_noise_pred_and_target): the second half of the batch is
    trained towards the prediction with the network switched off (set_multiplier 0, then back to 1)."""
    with torch.no_grad():
        network.set_multiplier(0.0)
        prior = predict(arch, tes, unet, batch)
        network.set_multiplier(1.0)
    half = batch["noise"].shape[0] // 2
    return torch.cat([batch["noise"][:half], prior[half:]])


@dataclass
class TrainerArgs:
    """The train_network.py options that reach the network module."""

    network_module: str = "kohya_plugin.blockwise"
    network_dim: int | None = 4
    network_alpha: float | None = 1.0
    network_args: list[str] = field(default_factory=list)
    network_dropout: float | None = None
    network_weights: str | None = None
    dim_from_weights: bool = False
    base_weights: list[str] | None = None
    base_weights_multiplier: list[float] | None = None
    learning_rate: float = 1e-2
    unet_lr: float | None = None
    text_encoder_lr: float | list[float] | None = None
    """A list (one rate per text encoder) reaches prepare_optimizer_params_with_multiple_te_lrs as it is."""
    cache_text_encoder_outputs: bool = False
    diff_output_preservation: bool = False
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    scale_weight_norms: float | None = None
    max_train_steps: int = 30
    steps_per_epoch: int = 10
    save_dtype: torch.dtype | None = None
    output: str | None = None
    seed: int = 0


@dataclass
class Result:
    network: nn.Module
    losses: list[float]
    param_groups: list[dict]
    descriptions: list[str] | None
    load_info: object = None
    max_norm_logs: list[tuple] = field(default_factory=list)
    text_encoder_train_flags: list[bool] = field(default_factory=list)
    multiple_te_lrs: bool = False
    """Whether the optimizer groups came from prepare_optimizer_params_with_multiple_te_lrs."""


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def train(
    arch: str,
    tes: list[nn.Module],
    unet: nn.Module,
    batch: dict[str, torch.Tensor],
    args: TrainerArgs,
    *,
    distributed: bool = False,
) -> Result:
    """Run the trainer's network calls in order. With `distributed`, torch.distributed must be initialised."""
    torch.manual_seed(args.seed)
    network_module = importlib.import_module(args.network_module)
    text_encoder = text_encoder_arg(arch, tes)

    for i, path in enumerate(args.base_weights or []):
        multipliers = args.base_weights_multiplier or []
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        module, weights_sd = network_module.create_network_from_weights(
            multiplier, path, None, text_encoder, unet, for_inference=True
        )
        module.merge_to(text_encoder, unet, weights_sd, torch.float32, "cpu")

    net_kwargs = {}
    for net_arg in args.network_args:
        key, value = net_arg.split("=", 1)
        net_kwargs[key] = value
    if args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(
            1, args.network_weights, None, text_encoder, unet, **net_kwargs
        )
    else:
        if "dropout" not in net_kwargs:
            net_kwargs["dropout"] = args.network_dropout
        network = network_module.create_network(
            1.0, args.network_dim, args.network_alpha, None, text_encoder, unet,
            neuron_dropout=args.network_dropout, **net_kwargs,
        )
    if hasattr(network, "prepare_network"):
        network.prepare_network(args)
    train_t5xxl = post_process_network(arch, args, network)

    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    load_info = network.load_weights(args.network_weights) if args.network_weights else None
    if args.gradient_checkpointing:
        if hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers checkpoints only in training mode, as the trainer sets it
        network.enable_gradient_checkpointing()

    multiple_te_lrs = hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs")
    text_encoder_lr = args.text_encoder_lr
    if not multiple_te_lrs and isinstance(text_encoder_lr, list):
        text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
    try:
        if multiple_te_lrs:
            results = network.prepare_optimizer_params_with_multiple_te_lrs(
                text_encoder_lr, args.unet_lr, args.learning_rate)
        else:
            results = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr, args.learning_rate)
        if isinstance(results, tuple):
            params, descriptions = results
        else:
            params, descriptions = results, None
    except TypeError:
        params, descriptions = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr), None
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)

    unet.requires_grad_(False)
    for t_enc in tes:
        t_enc.requires_grad_(False)
    if distributed:
        # accelerator.prepare(network): DDP broadcasts rank 0's parameters; its forward is never used.
        network = nn.parallel.DistributedDataParallel(network)
    _unwrap(network).prepare_grad_etc(text_encoder, unet)

    losses: list[float] = []
    max_norm_logs: list[tuple] = []
    step = 0
    while step < args.max_train_steps:
        _unwrap(network).on_epoch_start(text_encoder, unet)
        for _ in range(args.steps_per_epoch):
            if step >= args.max_train_steps:
                break
            if hasattr(_unwrap(network), "on_step_start"):
                _unwrap(network).on_step_start(text_encoder, unet)
            target = preserved_target(_unwrap(network), arch, tes, unet, batch) if args.diff_output_preservation else None
            loss = loss_of(arch, tes, unet, batch, target)
            loss.backward()
            if distributed:
                world = torch.distributed.get_world_size()
                for param in network.parameters():  # the trainer's all_reduce_network
                    if param.grad is not None:
                        torch.distributed.all_reduce(param.grad)
                        param.grad /= world
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(_unwrap(network).get_trainable_params(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.scale_weight_norms:
                max_norm_logs.append(
                    _unwrap(network).apply_max_norm_regularization(args.scale_weight_norms, "cpu")
                )
            losses.append(float(loss))
            step += 1

    network = _unwrap(network)
    if args.output:
        metadata = {
            "ss_network_module": args.network_module,
            "ss_network_dim": args.network_dim,
            "ss_network_alpha": args.network_alpha,
            "ss_network_args": json.dumps(net_kwargs),
            "ss_steps": step,
            "ss_output_name": Path(args.output).stem,
        }
        metadata = {k: str(v) for k, v in metadata.items()}
        network.save_weights(args.output, args.save_dtype, metadata)
    flags = text_encoder_train_flags(arch, train_text_encoder, train_t5xxl)
    return Result(network, losses, params, descriptions, load_info, max_norm_logs, flags, multiple_te_lrs)


def post_process_network(arch: str, args: TrainerArgs, network: nn.Module) -> bool:
    """The DiT trainers read `network.train_t5xxl` (no default) and refuse it with cached text-encoder outputs;
    the SD trainers do nothing. Returns whether T5 is trained."""
    if arch not in DIT_ARCHS:
        return False
    train_t5xxl = network.train_t5xxl
    if train_t5xxl and args.cache_text_encoder_outputs:
        raise ValueError("T5XXL is trained, so cache_text_encoder_outputs cannot be used")
    return bool(train_t5xxl)


def distributed_worker(rank: int, world_size: int, init_method: str, out_dir: str, steps: int) -> None:
    """One process of a gloo run (for torch.multiprocessing.spawn): its own data shard and its own network
    initialisation (seed = rank), as on real multi-GPU runs. Saves its adapter weights as rank{N}.safetensors."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        tes, unet = tiny_models("sd1")
        batch = synthetic_batch("sd1", seed=10 + rank)
        args = TrainerArgs(network_args=["preset=all", "conv_dim=2", "rank_dropout=0.2"], max_train_steps=steps,
                           seed=rank)
        result = train("sd1", tes, unet, batch, args, distributed=True)
        state = {k: v.detach().contiguous() for k, v in result.network.state_dict().items()}
        save_file(state, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
