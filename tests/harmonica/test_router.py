"""Router: initialisation, thresholding, save/load with model fingerprints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from harmonica import CacheSchedule, Router, units
from harmonica.router import FIRST_STEP_LOGIT, RouterMismatchError

from .tiny_models import ddim, tiny_dit, tiny_pixart


def test_init_pins_the_first_step_and_is_seeded():
    r = Router(5, 4, seed=3)
    assert r.logits.shape == (5, 4)
    assert (r.logits[0] == FIRST_STEP_LOGIT).all()
    torch.testing.assert_close(r.logits, Router(5, 4, seed=3).logits)
    assert not torch.equal(r.logits, Router(5, 4, seed=4).logits)
    assert r.logits.requires_grad


def test_to_schedule_thresholds_the_probabilities():
    r = Router(3, 2)
    with torch.no_grad():
        r.logits.copy_(torch.tensor([[-9.0, -9.0], [0.0, -3.0], [-1.0, 2.0]]))
    s = r.to_schedule(0.1)
    assert isinstance(s, CacheSchedule)
    # sigmoid: row 0 forced; 0.5 > 0.1, 0.047 < 0.1; 0.269 > 0.1, 0.88 > 0.1
    assert s.rows == ((True, True), (True, False), (True, True))
    assert r.to_schedule(0.5).rows == ((True, True), (False, False), (False, True))
    with pytest.raises(ValueError, match="threshold"):
        r.to_schedule(1.5)


def test_clamp_keeps_logits_in_bounds_and_row_0_pinned():
    r = Router(3, 2)
    with torch.no_grad():
        r.logits.mul_(100)
        r.logits[0] = -100
    r.clamp_()
    assert r.logits.abs().max() <= 5
    assert (r.logits[0] == FIRST_STEP_LOGIT).all()


def test_save_load_round_trip_with_metadata(tmp_path):
    model = tiny_pixart(num_layers=2)
    r = Router.for_model(model, 7, scheduler=ddim(), training={"method": "harmonica", "beta": 7e-8}, seed=2)
    path = tmp_path / "router.safetensors"
    r.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["router.safetensors"]  # no temporary left behind
    loaded = Router.load(path, model=model)
    torch.testing.assert_close(loaded.logits, r.logits, rtol=0, atol=0)
    assert loaded.unit_names == units(model)
    assert loaded.model_fingerprint["class"] == "PixArtTransformer2DModel"
    assert loaded.sampler["class"] == "DDIMScheduler"
    assert loaded.sampler["config"]["beta_schedule"] == "squaredcos_cap_v2"
    assert loaded.training_settings == {"method": "harmonica", "beta": 7e-8}
    assert loaded.to_schedule() == r.to_schedule()


def test_load_onto_another_model_names_both_shapes(tmp_path):
    path = tmp_path / "r.safetensors"
    Router.for_model(tiny_dit(num_layers=2), 4).save(path)
    with pytest.raises(RouterMismatchError) as err:
        Router.load(path, model=tiny_dit(num_layers=3, attention_head_dim=8))
    message = str(err.value)
    assert "DiTTransformer2DModel(depth=2, width=32" in message
    assert "DiTTransformer2DModel(depth=3, width=16" in message
    with pytest.raises(RouterMismatchError, match="PixArtTransformer2DModel"):
        Router.load(path, model=tiny_pixart(num_layers=2))


def test_load_refuses_files_that_are_not_routers(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Router.load(garbage)

    good = tmp_path / "good.safetensors"
    Router(3, 2).save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Router.load(truncated)

    plain = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a harmonica router"):
        Router.load(plain)

    inconsistent = tmp_path / "inconsistent.safetensors"
    meta = Router(3, 2).metadata() | {"num_steps": 4}
    save_file(
        {"logits": torch.zeros(3, 2)}, str(inconsistent), metadata={"harmonica.router": json.dumps(meta)}
    )
    with pytest.raises(ValueError, match=r"logits have shape \(3, 2\) but the metadata says \(4, 2\)"):
        Router.load(inconsistent)

    with pytest.raises(FileNotFoundError):
        Router.load(tmp_path / "missing.safetensors")


def test_router_without_fingerprint_checks_the_unit_count():
    with pytest.raises(RouterMismatchError, match="has 5 units but the model"):
        Router(3, 5).check_model(tiny_dit(num_layers=2))
    Router(3, 4).check_model(tiny_dit(num_layers=2))
