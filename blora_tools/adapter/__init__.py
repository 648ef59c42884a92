"""Adapter files: read, understand and write LoRA / LyCORIS safetensors files of every supported dialect.

Modules:
- `model`: the file model (`open_adapter` → `Adapter` of `Module`s), read lazily, architecture from evidence.
- `header`: read and check a safetensors header without torch.
- `formats`: tensor keys ↔ (module stem, parameter) for each key dialect; U-Net LDM ↔ diffusers names.
- `peft`: PEFT / diffusers keys and the `lora_adapter_metadata` JSON that carries alphas.
- `kinds`: adapter kinds (LoRA, LoHa, LoKr, …) and their algebra: ΔW, norms, scaled factors.
- `layers`: which base-model layer a module adapts, across namings, and its weight shape.
- `alpha`: alpha rules for written files (what an alpha reads back as, alphas loaders disagree on).
- `metadata`: metadata of written files: kept keys, dim/alpha, `blora_spec` and history.
- `tensors`: safetensors dtypes ↔ torch dtypes, tensors ↔ raw bytes.
- `floats`: numpy on stored bytes, no torch: the NaN/Inf test, a factor times a float, a scalar's bytes.
- `writer`: the streaming, atomic safetensors writer.
"""
