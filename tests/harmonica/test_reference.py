"""harmonica.reference (dataset, classifier, packaged DiT) and harmonica.sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from harmonica.reference import (
    ASSETS,
    NULL_CLASS,
    load_classifier,
    load_dataset,
    load_model,
    load_scheduler,
    null_class_id,
)
from harmonica.reference.classifier import evaluate_accuracy
from harmonica.sampling import sample

# Measured with the packaged weights (3 200 training steps): 20 DDIM steps, CFG 1.5, 2 images per
# class -> 19 of 20 classified as asked with seed 0 (seeds 0-4: 0.95, 0.95, 0.95, 1.0, 0.95); 500
# samples (seed 0) -> 94.2 %. The threshold leaves room for BLAS differences between machines
# without letting a broken model through.
SAMPLE_ACCURACY_THRESHOLD = 0.85
# The packaged classifier scores 0.994 on the held-out split.
CLASSIFIER_ACCURACY_THRESHOLD = 0.97

_HAVE_DIT = (ASSETS / "dit-digits" / "diffusion_pytorch_model.safetensors").is_file()
needs_dit = pytest.mark.skipif(
    not _HAVE_DIT,
    reason="packaged reference DiT weights absent: run python -m harmonica.reference.train "
    "--out python/harmonica/reference/assets/dit-digits",
)


# --- dataset ---------------------------------------------------------------------------------


def test_dataset_splits() -> None:
    sizes = {}
    for split in ("train", "test", "all"):
        images, labels = load_dataset(split)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape == (len(labels), 1, 16, 16)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.min() == -1.0 and images.max() > 0.9  # background and ink both present
        assert set(labels.tolist()) == set(range(10))
        sizes[split] = len(labels)
    assert sizes == {"train": 1437, "test": 360, "all": 1797}
    # Stratified: every class holds 19–21 % of its images out.
    per_class_test = load_dataset("test")[1].bincount()
    per_class_all = load_dataset("all")[1].bincount()
    assert ((per_class_test / per_class_all - 0.2).abs() < 0.01).all()


def test_dataset_split_is_fixed_and_disjoint() -> None:
    train, _ = load_dataset("train")
    test, _ = load_dataset("test")
    again, _ = load_dataset("test")
    assert torch.equal(test, again)
    everything, _ = load_dataset("all")
    assert len(train) + len(test) == len(everything)
    torch.testing.assert_close(torch.cat([train, test]).sum(0), everything.sum(0))  # a partition
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("validation")


# --- classifier ------------------------------------------------------------------------------


def test_classifier_accuracy_on_held_out_digits() -> None:
    classifier = load_classifier()
    images, labels = load_dataset("test")
    assert evaluate_accuracy(classifier, images, labels) >= CLASSIFIER_ACCURACY_THRESHOLD


def test_classifier_features_are_full_rank() -> None:
    # Pre-ReLU features: no dead units, so the FID covariance is not singular.
    classifier = load_classifier()
    images, _ = load_dataset("test")
    with torch.no_grad():
        feats = classifier.features(images)
    assert feats.shape == (360, classifier.config.feature_dim)
    assert torch.linalg.matrix_rank(torch.cov(feats.T.double())) == classifier.config.feature_dim
    with pytest.raises(ValueError, match="expected images"):
        classifier(torch.zeros(2, 1, 8, 8))


# --- the packaged DiT ------------------------------------------------------------------------


@needs_dit
def test_reference_model_config_and_loading() -> None:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    model = load_model()
    assert isinstance(model, DiTTransformer2DModel) and not model.training
    cfg = model.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels, cfg.patch_size) == (16, 1, 1, 2)
    assert cfg.num_layers >= 8 and cfg.num_embeds_ada_norm == 10
    assert null_class_id(model) == NULL_CLASS == 10
    # The same folder loads through plain diffusers, as a user's DiT-XL/2 folder would.
    plain = DiTTransformer2DModel.from_pretrained(ASSETS / "dit-digits")
    for (name, p), q in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    scheduler = load_scheduler()
    assert isinstance(scheduler, DDIMScheduler)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert load_model(dtype=torch.bfloat16).dtype == torch.bfloat16


@needs_dit
def test_reference_samples_are_digits_of_the_asked_class() -> None:
    model, scheduler, classifier = load_model(), load_scheduler(), load_classifier()
    labels = torch.arange(10).repeat_interleave(2)
    images = sample(
        model,
        scheduler,
        labels,
        num_inference_steps=20,
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert images.shape == (20, 1, 16, 16)
    accuracy = evaluate_accuracy(classifier, images, labels)
    assert accuracy >= SAMPLE_ACCURACY_THRESHOLD, f"sample accuracy {accuracy:.2f}"


# --- sampling --------------------------------------------------------------------------------


class _StubDiT(nn.Module):
    """Predicts eps = 1 for real labels and 0 for the null label; a learned-sigma extra channel."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(sample_size=4, in_channels=1, out_channels=2, num_embeds_ada_norm=10)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> SimpleNamespace:
        assert timestep.shape == class_labels.shape == (x.shape[0],)
        self.batch_sizes.append(x.shape[0])
        eps = (class_labels != 10).float().view(-1, 1, 1, 1).expand_as(x)
        return SimpleNamespace(sample=torch.cat([eps, torch.full_like(x, 123.0)], dim=1))


class _StubScheduler:
    """Two steps of x ← x − eps, so the result is noise − 2 · guided eps."""

    init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | None = None) -> None:
        self.timesteps = torch.arange(num_inference_steps, 0, -1)

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def step(
        self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor, return_dict: bool
    ) -> tuple[torch.Tensor]:
        return (x - eps,)


class _Handle:
    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


def test_sample_applies_batched_guidance_and_resets_the_cache() -> None:
    model, noise = _StubDiT(), torch.zeros(3, 1, 4, 4)
    model._harmonica_cache = _Handle()
    out = sample(
        model,
        _StubScheduler(),
        [1, 2, 3],
        num_inference_steps=2,
        guidance_scale=1.5,
        noise=noise,
        clamp=False,
    )
    torch.testing.assert_close(out, torch.full((3, 1, 4, 4), -3.0))  # 0 − 2 · (0 + 1.5 · (1 − 0))
    assert model.batch_sizes == [6, 6]  # one call per step, cond and uncond together
    assert model._harmonica_cache.resets == 1
    out = sample(model, _StubScheduler(), [1, 2, 3], num_inference_steps=2, guidance_scale=1.0, noise=noise)
    torch.testing.assert_close(out, torch.full((3, 1, 4, 4), -1.0))  # −2, clamped
    assert model.batch_sizes[2:] == [3, 3]
    assert model._harmonica_cache.resets == 2


def test_sample_noise_and_generator_agree() -> None:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        num_layers=1,
        sample_size=8,
        num_embeds_ada_norm=10,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    a = sample(model, scheduler, [3, 7], num_inference_steps=3, noise=noise)
    b = sample(model, scheduler, [3, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and a.abs().max() <= 1.0


def test_sample_rejects_bad_arguments() -> None:
    model, scheduler = _StubDiT(), _StubScheduler()
    with pytest.raises(ValueError, match="class labels must lie"):
        sample(model, scheduler, [10])
    with pytest.raises(ValueError, match="noise must have shape"):
        sample(model, scheduler, [1, 2], noise=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="guidance_scale"):
        sample(model, scheduler, [1], guidance_scale=0.5)
    with pytest.raises(ValueError, match="num_embeds_ada_norm"):
        null_class_id(nn.Linear(1, 1))


# --- training --------------------------------------------------------------------------------


def test_build_model_starts_as_adaln_zero() -> None:
    from harmonica.reference.model import build_model

    model = build_model()
    assert 2_700_000 < sum(p.numel() for p in model.parameters()) < 2_900_000
    for block in model.transformer_blocks:
        assert not block.norm1.linear.weight.any() and block.norm1.emb.class_embedder.dropout_prob == 0
    x = torch.randn(2, 1, 16, 16)
    out = model(x, timestep=torch.tensor([10, 900]), class_labels=torch.tensor([3, NULL_CLASS])).sample
    assert out.shape == x.shape and not out.any()  # zero-initialised output layer


def test_train_resumes_exactly_and_saves_a_loadable_folder(tmp_path, monkeypatch) -> None:
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file

    from harmonica.reference.model import DIT_CONFIG
    from harmonica.reference.train import TrainConfig, train

    # A 1-block, width-16 model: the loop, checkpoints and saving are what is tested here.
    monkeypatch.setitem(DIT_CONFIG, "num_layers", 1)
    monkeypatch.setitem(DIT_CONFIG, "attention_head_dim", 4)

    def run(out: str, steps: int, ckpt: str, resume: bool) -> None:
        cfg = TrainConfig(steps=steps, batch=4)
        train(tmp_path / out, cfg, ckpt_dir=tmp_path / ckpt, ckpt_every=1, resume=resume, progress=False)

    run("straight", 2, "ckpt_a", resume=False)
    run("split", 1, "ckpt_b", resume=False)
    run("split", 2, "ckpt_b", resume=True)
    weights = "diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "split" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = load_model(tmp_path / "split")
    assert model.config.num_embeds_ada_norm == NULL_CLASS
    assert isinstance(load_scheduler(tmp_path / "split"), DDIMScheduler)
    assert not (tmp_path / "split" / "last.pt").exists()  # checkpoints stay out of the model folder


def test_flow_reference_trains_on_the_rectified_flow_objective_and_saves_what_compare_loads(
    tmp_path, monkeypatch
) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file

    from harmonica.compare import flow_setup
    from harmonica.reference import NUM_CLASSES, load_flow_model, load_flow_scheduler
    from harmonica.reference.flow import SD3_CONFIG, digit_prompts, train_flow
    from harmonica.reference.train import TrainConfig, _batch_indices

    monkeypatch.setitem(SD3_CONFIG, "num_layers", 2)
    monkeypatch.setitem(SD3_CONFIG, "attention_head_dim", 8)
    monkeypatch.setitem(SD3_CONFIG, "caption_projection_dim", 32)  # = heads × head_dim
    cfg = TrainConfig(steps=1, batch=4, label_drop_prob=0.5)
    summary = train_flow(tmp_path / "flow", cfg, ckpt_dir=tmp_path / "ckpt", progress=False)
    # The model starts at velocity 0 (zeroed output layer), so the first loss is the target's mean
    # square: the velocity noise − x0 at σ ~ U[0, 1], drawn as the definition says.
    images, _ = load_dataset("train")
    x0 = images[_batch_indices(0, len(images), cfg.batch, cfg.seed)]
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.rand(cfg.batch, generator=generator)  # σ
    noise = torch.randn(x0.shape, generator=generator)
    assert summary["final_loss_last100"] == pytest.approx((noise - x0).square().mean().item(), rel=1e-5)

    model = load_flow_model(tmp_path / "flow")
    scheduler = load_flow_scheduler(tmp_path / "flow")
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 1.0
    prompts = load_file(tmp_path / "flow" / "prompts.safetensors")
    assert all(torch.equal(prompts[k], v) for k, v in digit_prompts().items())
    assert prompts["prompt_embeds"].shape[0] == NUM_CLASSES
    setup = flow_setup(model, scheduler, prompts, 1.5, None)  # what harmonica compare builds
    assert setup.sample_shape == (1, 16, 16)
    with pytest.raises(FileNotFoundError, match="expected a diffusers model folder"):
        load_flow_model(tmp_path / "missing")
