"""The low-rank algebra against dense SVDs computed in the test."""

from __future__ import annotations

import pytest
import torch

from blora_tools.errors import BloraError, NonFiniteError, SelectorError
from blora_tools.ops.lowrank import (
    RankPlan,
    RankRule,
    decompose_dense,
    decompose_factors,
    rank_plan,
    spectrum_of_dense,
    spectrum_of_factors,
)


def _terms(seed: int, out: int, fan_in: int, ranks: list[int]):
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(out, r, generator=g) for r in ranks]
    downs = [torch.randn(r, fan_in, generator=g) for r in ranks]
    return ups, downs


@pytest.mark.parametrize(
    "out, fan_in, ranks",
    [(40, 30, [4]), (40, 30, [4, 8]), (12, 50, [8, 8]), (50, 6, [4, 4]), (30, 30, [3, 5, 2])],
    ids=["one", "two", "R>out", "R>in", "three"],
)
def test_decompose_factors_equals_dense_svd(out, fan_in, ranks):
    ups, downs = _terms(1, out, fan_in, ranks)
    dense = sum(u.double() @ d.double() for u, d in zip(ups, downs))
    d = decompose_factors(ups, downs)
    expected = torch.linalg.svdvals(dense)
    k = d.max_rank
    assert k == min(out, fan_in, sum(ranks))
    torch.testing.assert_close(d.s.double(), expected[:k], rtol=1e-5, atol=1e-5)
    rebuilt = (d.u.double() * d.s.double()) @ d.v.double()
    assert float((rebuilt - dense).norm() / dense.norm()) < 1e-5
    torch.testing.assert_close(d.u.T @ d.u, torch.eye(k, dtype=d.u.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "out, fan_in, ranks",
    [(40, 30, [4, 8]), (12, 50, [8, 8]), (30, 30, [3, 5, 2]), (20, 16, [3, 3])],
    ids=["two", "R>out", "three", "dependent"],
)
def test_spectrum_alone_equals_the_dense_singular_values(out, fan_in, ranks):
    """The values-only route (for rank choice and energy) gives the singular values the full route gives."""
    ups, downs = _terms(4, out, fan_in, ranks)
    if len(ranks) == 2 and ranks == [3, 3]:  # a repeated term: the stacked factors are rank-deficient
        ups, downs = [ups[0], ups[0]], [downs[0], downs[0]]
    dense = sum(u.double() @ d.double() for u, d in zip(ups, downs))
    expected = torch.linalg.svdvals(dense)
    spectrum = spectrum_of_factors(ups, downs)
    full = decompose_factors(ups, downs)
    assert spectrum.max_rank == full.max_rank == min(out, fan_in, sum(ranks))
    torch.testing.assert_close(spectrum.s.double(), expected[: spectrum.max_rank], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spectrum.s, full.s, rtol=1e-9, atol=1e-9)
    assert spectrum.energy == pytest.approx(float(dense.norm() ** 2), rel=1e-9)
    assert spectrum.retained(2) == pytest.approx(full.retained(2), rel=1e-9)
    dense_values = spectrum_of_dense(dense.float())
    torch.testing.assert_close(dense_values.s.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_factors_truncate_like_dense_svd(rank):
    ups, downs = _terms(2, 24, 20, [4, 4])
    dense = sum(u.double() @ d.double() for u, d in zip(ups, downs))
    u, s, vt = torch.linalg.svd(dense)
    expected = (u[:, :rank] * s[:rank]) @ vt[:rank]
    up, down = decompose_factors(ups, downs).factors(rank, gain=2.5)
    assert up.shape == (24, rank) and down.shape == (rank, 20)
    got = up.double() @ down.double() / 2.5
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    # the magnitude is split evenly: both factors carry √s
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_factors_pad_past_the_available_rank():
    ups, downs = _terms(3, 10, 10, [2])
    up, down = decompose_factors(ups, downs).factors(5)
    assert up.shape == (10, 5) and down.shape == (5, 10)
    assert float(up[:, 2:].abs().max()) == 0.0


def test_decompose_dense_and_energy():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 3, 3, 3, generator=g)
    d = decompose_dense(w)
    assert d.max_rank == 16
    assert d.energy == pytest.approx(float(w.double().norm() ** 2), rel=1e-5)
    assert d.retained(16) == pytest.approx(1.0)
    assert 0 < d.retained(1) < 1


def test_zero_delta_keeps_one_rank_and_full_energy():
    d = decompose_factors([torch.zeros(8, 2)], [torch.randn(2, 6)])
    assert d.retained(1) == 1.0
    assert RankRule("sv_fro", 0.9).rank(d.s) == 1


S = torch.tensor([4.0, 2.0, 1.0, 0.5])


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("sv_fro:1.0", 4),
        ("sv_fro:0.9", 2),  # √(16+4)/√21.25 = 0.970 ≥ 0.9; √16/√21.25 = 0.868
        ("sv_fro:0.97", 2),
        ("sv_fro:0.98", 3),
        ("sv_ratio:2", 2),  # keep s ≥ 4/2
        ("sv_ratio:1", 1),
        ("sv_ratio:100", 4),
        ("sv_cumulative:0.5", 1),  # 4/7.5 = 0.53
        ("sv_cumulative:0.85", 3),  # 6/7.5 = 0.8, 7/7.5 = 0.93
    ],
)
def test_rank_rules(rule, expected):
    assert RankRule.from_text(rule).rank(S) == expected


@pytest.mark.parametrize("text", ["sv_fro", "sv_fro:x", "nope:0.5", "sv_fro:1.5", "sv_ratio:0.5", "sv_cumulative:0"])
def test_bad_rank_rules(text):
    with pytest.raises(BloraError):
        RankRule.from_text(text)


def test_rank_plan_forms():
    assert rank_plan("16", "sd1").cap("IN01", conv=False) == 16
    plan = rank_plan("in0=8,out3=16", "sd1", conv=2)
    assert plan.cap("IN01", False) == 8 and plan.cap("OUT11", False) == 16
    assert plan.cap("M00", False) is None  # unnamed: keep every rank
    assert plan.cap("IN02", True) == 2  # conv modules follow --conv-rank
    assert rank_plan("unet=4,mid=0", "sd1").cap("M00", True) == 0
    assert RankPlan(None, {}, 3).cap("te", False) is None


@pytest.mark.parametrize("text", ["in0=1.5", "in0=-1", "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "0"])
def test_rank_plan_refuses(text):
    with pytest.raises((BloraError, SelectorError)):
        rank_plan(text, "sd1")


def _dense_truncation_error(dense: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(dense.double())
    return float(s[rank:].norm() / s.norm())


@pytest.mark.parametrize(
    "case",
    ["same twice", "opposite", "tiny second", "decaying spectrum"],
)
def test_gram_route_matches_dense_svd_on_hard_inputs(case):
    """Linearly dependent factors (a singular Gram matrix), exact cancellation, terms of very different size
    and a fast-decaying spectrum: the truncation error is the dense SVD's."""
    ups, downs = _terms(5, 60, 48, [6, 6])
    if case == "same twice":
        ups, downs = [ups[0], ups[0]], [downs[0], downs[0]]
    elif case == "opposite":
        ups, downs = [ups[0], -ups[0]], [downs[0], downs[0]]
    elif case == "tiny second":
        ups = [ups[0], ups[1] * 1e-5]
    else:
        decay = torch.logspace(0, -6, 6)
        ups = [ups[0] * decay, ups[1] * decay * 1e-2]
    dense = sum(u.double() @ d.double() for u, d in zip(ups, downs))
    d = decompose_factors(ups, downs)
    expected = torch.linalg.svdvals(dense)
    # backward stable in the factors' norm: what float32 factors can resolve at all
    size = float(torch.cat(ups, 1).double().norm() * torch.cat(downs, 0).double().norm())
    torch.testing.assert_close(d.s.double(), expected[: d.max_rank], rtol=1e-6, atol=1e-7 * size)
    for rank in (1, 3, 6):
        up, down = d.factors(rank)
        got = up.double() @ down.double()
        if float(dense.norm()) == 0.0:
            assert float(got.norm()) <= 1e-7 * size
            continue
        error = float((dense - got).norm() / dense.norm())
        assert error == pytest.approx(_dense_truncation_error(dense, rank), abs=1e-7)


def test_nonfinite_factors_are_refused():
    ups, downs = _terms(6, 20, 16, [3])
    ups[0][2, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        decompose_factors(ups, downs)
    with pytest.raises(NonFiniteError):
        decompose_dense(torch.full((4, 4), float("inf")))


def test_decompose_on_a_named_device_returns_tensors_there():
    ups, downs = _terms(7, 30, 20, [4, 2])
    d = decompose_factors(ups, downs, device="cpu")
    up, down = d.factors(3)
    assert up.device.type == down.device.type == "cpu"
    torch.testing.assert_close(d.s, decompose_factors(ups, downs).s)
