"""Operations on opened adapters: the surgery behind the CLI commands, and the figures they report.

Modules:
- `prune`: remove whole modules by block, copying kept tensors byte for byte.
- `reweight`: multiply each module's ΔW by its block's weight.
- `resize`: re-compress an adapter to new ranks, per block or by a dynamic rule.
- `merge`: merge adapters with per-input ratios and block sets (`concat` exact, `svd` re-compressed).
- `convert`: kohya ↔ PEFT/diffusers, SDXL LDM ↔ diffusers names, one alpha for every module.
- `compare`: compare two adapters block by block.
- `stats`: per-block figures of one adapter (the `inspect` report).
- `lowrank`: low-rank algebra without dense ΔW (Gram route, small eigenproblem, rank rules).
- `uniform`: one alpha for every module; kohya tensors with a factor folded in.
- `result`: what every surgery returns (entries to write, metadata, warnings, summary) and how it is saved.
"""
