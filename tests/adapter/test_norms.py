"""One Gram-norm computation (`kinds.factored_inner` / `gram_norm`): both routes against dense products."""

from __future__ import annotations

import pytest
import torch

from blora_tools.adapter.kinds import Kind, factored_inner, frobenius_norm, gram_norm


def _factors(seed: int, out: int, fan_in: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, fan_in, generator=g)


@pytest.mark.parametrize(
    "out, fan_in, rank",
    [(33, 17, 6), (3, 2, 9), (1, 1, 1)],
    ids=["gram route (r² < out·in)", "dense route (r² ≥ out·in)", "1×1"],
)
def test_norm_and_inner_equal_dense_products(out, fan_in, rank):
    up_a, down_a = _factors(1, out, fan_in, rank)
    up_b, down_b = _factors(2, out, fan_in, rank + 2)
    dense_a, dense_b = (up_a.double() @ down_a.double()), (up_b.double() @ down_b.double())
    assert gram_norm(up_a, down_a) == pytest.approx(float(dense_a.norm()), rel=1e-12)
    assert factored_inner(up_a, down_a, up_b, down_b) == pytest.approx(float((dense_a * dense_b).sum()), rel=1e-10)


def test_huge_rank_on_a_tiny_layer_takes_the_dense_route():
    # r = 200 000 on a 2×2 layer: the Gram route's r×r float64 matrix would be 320 GB (the allocation fails at
    # once); the dense route forms a 2×2 product from 3.2 MB of factors.
    rank = 200_000
    up, down = torch.full((2, rank), 1e-3), torch.full((rank, 2), 2e-3)
    expected = 2 * rank * 1e-3 * 2e-3  # every entry of up·down is Σ 1e-3·2e-3 over the rank
    assert gram_norm(up, down) == pytest.approx(expected, rel=1e-6)


def test_nonfinite_factor_gives_nonfinite_norm_on_both_routes():
    for out, fan_in, rank in ((30, 30, 2), (2, 2, 8)):
        up, down = _factors(3, out, fan_in, rank)
        up[0, 0] = float("inf")
        down[:, 0] = 0.0
        norm = frobenius_norm(Kind.LORA, {"lora_up.weight": up, "lora_down.weight": down}, 1.0, (out, fan_in))
        assert not (norm < float("inf"))  # inf or NaN, never a finite number
