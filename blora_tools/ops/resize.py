"""Resize: re-compress one adapter to new ranks, per block or by a dynamic rule, reporting what is kept.

A resize is an `svd` merge of one input at ratio 1 (`merge`): each module's ΔW is decomposed through the Gram
matrices of its factors (no dense matrix for LoRA kinds), truncated to the rank its block allows, and written with one
alpha for the whole file and the rest of its scale folded into the factors, so ΔW keeps its scale.
The summary gives, per paper group, the input and output ranks and the share of ‖ΔW‖_F² kept.
"""

from __future__ import annotations

from blora_tools.adapter.model import Adapter
from blora_tools.errors import BloraError
from blora_tools.ops.lowrank import RankPlan
from blora_tools.ops.merge import Source, merge
from blora_tools.ops.result import Progress, Result

__all__ = ["resize"]


def resize(
    adapter: Adapter,
    plan: RankPlan,
    *,
    alpha: float | None = None,
    dtype: str | None = None,
    clamp_quantile: float | None = None,
    text: str = "",
    progress: Progress | None = None,
    device=None,
) -> Result:
    """Resize every module to the rank `plan` gives its block (modules already smaller keep their rank).

    `text` is the user's rank text, recorded in the history; `device` is where the decompositions run.
    """
    if plan.default is None and not plan.ranks and plan.conv is None and plan.rule is None:
        raise BloraError("resize needs --rank, --conv-rank or --dynamic", adapter.path)
    result = merge(
        [Source(adapter)],
        method="svd",
        plan=plan,
        alpha=alpha,
        dtype=dtype,
        clamp_quantile=clamp_quantile,
        energy=True,
        operation="resize",
        arguments={"rank_text": text} if text else None,
        progress=progress,
        device=device,
    )
    result.summary["input"] = str(adapter.path)
    result.summary["plan"] = plan.describe()
    return result
