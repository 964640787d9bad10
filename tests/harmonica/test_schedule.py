"""CacheSchedule: constructors, validation, statistics and the FLOP-ideal speedup."""

from __future__ import annotations

import pytest
import torch

from harmonica import CacheSchedule, units
from harmonica.models import fingerprint, flop_profile

from .tiny_models import tiny_dit, tiny_pixart


def test_full_computes_everything():
    s = CacheSchedule.full(5, 3)
    assert (s.num_steps, s.num_units) == (5, 3)
    assert s.compute.all()
    assert s.cache_usage_ratio == 0.0
    assert s.reused_units == (False, False, False)


@pytest.mark.parametrize("interval", [1, 2, 3, 7])
def test_fora_computes_every_interval_steps(interval):
    s = CacheSchedule.fora(10, 4, interval)
    for t in range(10):
        assert s.compute[t].tolist() == [t % interval == 0] * 4
    reused_steps = sum(t % interval != 0 for t in range(10))
    assert s.cache_usage_ratio == pytest.approx(reused_steps / 10)


def test_from_mask_requires_a_full_first_row():
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 2] = False
    with pytest.raises(ValueError, match=r"step 0 must compute every unit.*units \[2\]"):
        CacheSchedule.from_mask(mask)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.ones(4, dtype=torch.bool), ValueError, r"\[T, U\]"),
        (torch.ones(0, 3, dtype=torch.bool), ValueError, r"\[T, U\]"),
        (torch.full((2, 2), 0.7), TypeError, "Threshold"),
        (torch.tensor([[1, 2], [1, 0]]), ValueError, "only hold 0"),
    ],
)
def test_from_mask_rejects_bad_masks(mask, error, match):
    with pytest.raises(error, match=match):
        CacheSchedule.from_mask(mask)


def test_from_mask_accepts_lists_and_0_1_integers():
    s = CacheSchedule.from_mask([[1, 1], [0, 1]])
    assert s.compute.dtype == torch.bool
    assert s.rows == ((True, True), (False, True))
    assert s.cache_usage_ratio == 0.25
    assert s.reused_units == (True, False)


def test_schedule_is_immutable_and_comparable():
    mask = torch.ones(3, 2, dtype=torch.bool)
    s = CacheSchedule.from_mask(mask)
    mask[1, 0] = False
    s.compute[1, 1] = False
    assert s.compute.all()
    assert s == CacheSchedule.full(3, 2)
    assert hash(s) == hash(CacheSchedule.full(3, 2))
    assert s != CacheSchedule.fora(3, 2, 2)


def test_equal_rows_are_one_object():
    rows = CacheSchedule.fora(6, 3, 2).rows
    assert rows[0] is rows[2] is rows[4]
    assert rows[1] is rows[3] is rows[5]


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_constructors_validate_sizes(bad):
    with pytest.raises(ValueError):
        CacheSchedule.full(bad, 2)
    with pytest.raises(ValueError):
        CacheSchedule.fora(4, 2, bad)


def test_flop_profile_matches_the_analytic_dit_block():
    model = tiny_dit(num_layers=2)
    profile = flop_profile(model)
    n, d = profile.tokens, model.inner_dim
    assert n == 16
    attn = 4 * 2 * n * d * d + 2 * 2 * n * n * d  # q, k, v, out projections + QK^T and AV
    ff = 2 * 2 * n * d * (4 * d)  # d -> 4d -> d
    assert profile.units == (attn, ff, attn, ff)
    assert profile.always > 0  # embeddings, adaLN, final layer


def test_flop_profile_counts_pixart_cross_attention_with_text_tokens():
    model = tiny_pixart(num_layers=1)
    n, d, text = 16, model.inner_dim, 7
    profile = flop_profile(model, text_tokens=text)
    cross = 2 * 2 * n * d * d + 2 * 2 * text * d * d + 2 * 2 * n * text * d  # q, out; k, v; attention
    assert profile.units[1] == cross


def test_ideal_speedup():
    model = tiny_dit(num_layers=2)
    profile = flop_profile(model)
    u = len(units(model))
    assert CacheSchedule.full(10, u).ideal_speedup(model) == pytest.approx(1.0)
    fora2 = CacheSchedule.fora(10, u, 2).ideal_speedup(model)
    expected = 10 * profile.total / (10 * profile.always + 5 * sum(profile.units))
    assert fora2 == pytest.approx(expected)
    assert 1.0 < fora2 < 2.0  # the always-run part bounds it below the interval
    mask = torch.ones(3, u, dtype=torch.bool)
    mask[1:, 1] = False  # skip only blocks.0.ff on two steps
    one_unit = CacheSchedule.from_mask(mask).ideal_speedup(model)
    assert one_unit == pytest.approx(3 * profile.total / (3 * profile.total - 2 * profile.units[1]))


def test_ideal_speedup_checks_the_unit_count():
    with pytest.raises(ValueError, match="3 units but the model has 4"):
        CacheSchedule.full(2, 3).ideal_speedup(tiny_dit(num_layers=2))


def test_fingerprint_names_the_shape():
    fp = fingerprint(tiny_pixart(num_layers=1))
    assert fp["class"] == "PixArtTransformer2DModel"
    assert (fp["depth"], fp["width"], fp["heads"], fp["patch_size"]) == (1, 32, 2, 2)
    assert fp["units"] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.0.ff"]


def test_even_steps_reuses_whole_steps_at_the_asked_usage_evenly():
    for steps, usage, warmup in [
        (20, 0.35, 1),
        (20, 0.4, 1),
        (13, 0.3, 1),
        (7, 0.5, 1),
        (20, 0.55, 3),
        (11, 0.6, 4),
    ]:
        schedule = CacheSchedule.even_steps(steps, 3, usage, warmup=warmup)
        reused = [t for t in range(steps) if not bool(schedule.compute[t].any())]
        assert len(reused) == round(usage * steps) and min(reused) >= warmup
        assert bool((schedule.compute.all(1) | ~schedule.compute.any(1)).all())  # whole steps only
        gaps = [b - a for a, b in zip(reused, reused[1:], strict=False)]
        assert max(gaps) - min(gaps) <= 1
    assert CacheSchedule.even_steps(20, 4, 0.5) == CacheSchedule.fora(20, 4, 2)
    with pytest.raises(ValueError, match="usage is a cache usage ratio"):
        CacheSchedule.even_steps(20, 4, 1.0)
    with pytest.raises(ValueError, match="warmup is a number of computed first steps in 1…T−1, got 0"):
        CacheSchedule.even_steps(20, 4, 0.5, warmup=0)
