"""harmonica.eval: every metric against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harmonica.eval import class_accuracy, classifier_features, classifier_fid, fid, mse, psnr, ssim


def _const(values: list[float], shape: tuple[int, int, int] = (1, 16, 16)) -> torch.Tensor:
    """A batch of constant images, one per value: float32 [len(values), *shape]."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, *shape).contiguous()


# --- mse / psnr ------------------------------------------------------------------------------


def test_mse_of_constant_offsets() -> None:
    a = _const([0.0, 0.0, 0.0])
    b = _const([0.1, -0.5, 1.0])
    torch.testing.assert_close(mse(a, b, reduction="none"), torch.tensor([0.01, 0.25, 1.0]))
    torch.testing.assert_close(mse(a, b), torch.tensor((0.01 + 0.25 + 1.0) / 3))


def test_psnr_of_known_mse() -> None:
    a = _const([0.0, 0.0])
    b = _const([0.1, 0.5])  # per-image MSE 0.01 and 0.25; data range 2 -> peak² = 4
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.25)])
    torch.testing.assert_close(psnr(a, b, reduction="none"), expected)
    torch.testing.assert_close(psnr(a, b), expected.mean())
    torch.testing.assert_close(psnr(a, b, data_range=1.0, reduction="none"), expected - 10 * math.log10(4))


def test_psnr_of_identical_images_is_inf() -> None:
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).item()


# --- ssim ------------------------------------------------------------------------------------


def test_ssim_of_identical_images_is_one() -> None:
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(ssim(x, x, reduction="none"), torch.ones(3))


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Constant images have zero variance, so SSIM = (2·μa·μb + C1) / (μa² + μb² + C1) with
    # C1 = (0.01 · data_range)²; the Gaussian window sums to one, so this holds exactly.
    # float64, because the variances are computed as E[x²] − μ², which float32 leaves at ~1e-8.
    a, b = _const([0.5, 0.2]).double(), _const([-0.5, 0.2]).double()
    c1 = (0.01 * 2.0) ** 2
    expected = torch.tensor([(2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1), 1.0], dtype=torch.float64)
    torch.testing.assert_close(ssim(a, b, reduction="none"), expected)


def test_ssim_is_symmetric_and_below_one_for_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert 0.0 < ssim(x, y).item() < 1.0


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="too small"):
        ssim(x, x)  # sigma 1.0 -> 9×9 window


# --- shared input checks -----------------------------------------------------------------------


@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_pair_metrics_reject_bad_inputs(metric) -> None:
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="shape mismatch"):
        metric(x, torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="dtype mismatch"):
        metric(x, x.double())
    with pytest.raises(ValueError, match="floating-point"):
        metric(x.long(), x.long())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        metric(x[0], x[0])
    with pytest.raises(ValueError, match="reduction"):
        metric(x, x, reduction="sum")


# --- fid -------------------------------------------------------------------------------------


def test_fid_of_identical_sets_is_zero() -> None:
    f = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert abs(fid(f, f).item()) < 1e-9


def test_fid_of_1d_gaussians() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 1, generator=gen)
    b = 2.0 * torch.randn(200, 1, generator=gen) + 1.0
    # Sample statistics (unbiased std), in float64 like fid itself.
    a64, b64 = a.double(), b.double()
    expected = (a64.mean() - b64.mean()) ** 2 + (a64.std() - b64.std()) ** 2
    torch.testing.assert_close(fid(a, b), expected)


def test_fid_of_a_translated_set_is_the_squared_shift() -> None:
    a = torch.randn(100, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(fid(a, a + shift), shift.square().sum())


def test_fid_matches_torchmetrics_frechet_distance() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(nn.Module):
        num_features = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    mix = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 2.0]], dtype=torch.float64)
    b = torch.randn(40, 3, generator=gen, dtype=torch.float64) @ mix + 0.3
    reference = FrechetInceptionDistance(feature=Identity())
    reference.update(a, real=True)
    reference.update(b, real=False)
    torch.testing.assert_close(fid(b, a), reference.compute().double())
    torch.testing.assert_close(fid(a, b), fid(b, a))


def test_fid_rejects_bad_inputs() -> None:
    f = torch.randn(10, 4)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fid(f, torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid(f, f[:1])
    with pytest.raises(ValueError, match=r"float tensor \[N, D\]"):
        fid(f.view(10, 2, 2), f)
    with pytest.raises(ValueError, match=r"float tensor \[N, D\]"):
        fid(f.long(), f)


# --- classifier-based metrics -------------------------------------------------------------------


class _BrightnessClassifier(nn.Module):
    """Stub: class = round(4.5 · (mean pixel + 1)) of 10; feature = (mean, mean²) before ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, m * m], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = torch.round(4.5 * (x.mean(dim=(1, 2, 3)) + 1)).long().clamp(0, 9)
        return nn.functional.one_hot(cls, 10).float()


def test_class_accuracy_counts_matches() -> None:
    images = _const([-1.0, 1.0, -1.0 + 2 / 9 * 3, 0.0])  # classes 0, 9, 3, round(4.5) = 4
    labels = torch.tensor([0, 9, 3, 5])
    torch.testing.assert_close(class_accuracy(images, labels, _BrightnessClassifier()), torch.tensor(0.75))


def test_class_accuracy_rejects_bad_labels() -> None:
    images = _const([0.0, 0.0])
    with pytest.raises(ValueError, match="labels must be integer"):
        class_accuracy(images, torch.tensor([0, 1, 2]), _BrightnessClassifier())
    with pytest.raises(ValueError, match="labels must be integer"):
        class_accuracy(images, torch.tensor([0.0, 1.0]), _BrightnessClassifier())


def test_classifier_fid_uses_the_classifier_features() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(30, 1, 16, 16, generator=gen) * 2 - 1
    b = torch.rand(20, 1, 16, 16, generator=gen) - 0.5
    stub = _BrightnessClassifier()
    feats_a = classifier_features(a, stub)
    assert feats_a.shape == (30, 2) and feats_a.dtype == torch.float32
    torch.testing.assert_close(classifier_fid(a, b, stub), fid(feats_a, classifier_features(b, stub)))
    assert abs(classifier_fid(a, a, stub).item()) < 1e-9
    with pytest.raises(ValueError, match=r"float images \[B, C, H, W\]"):
        classifier_features(a[0], stub)


def test_kid_matches_torchmetrics_kernel_inception_distance_on_custom_features():
    """Our unbiased cubic-kernel MMD² against torchmetrics' KID (one subset of the whole set, which
    is a permutation and so the same estimate), on odd sample counts and width."""
    from torchmetrics.image.kid import KernelInceptionDistance

    from harmonica.eval import kid

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 11, generator=gen)
    b = torch.randn(29, 11, generator=gen) * 1.3 + 0.2

    class Identity(torch.nn.Module):
        num_features = 11

        def forward(self, x):
            return x

    metric = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=29, normalize=True)
    metric.update(a[:29].double(), real=True)
    metric.update(b.double(), real=False)
    expected, _ = metric.compute()
    torch.testing.assert_close(kid(a[:29], b), expected.double(), rtol=1e-6, atol=1e-9)
    one = torch.randn(800, 11, generator=gen)
    assert abs(kid(one[:400], one[400:]).item()) < 0.1 * kid(a, b).item()  # unbiased: ≈ 0 for one law
    with pytest.raises(ValueError, match="feature dimensions differ"):
        kid(a, b[:, :5])


def test_bootstrap_interval_covers_the_statistic_and_narrows_with_samples():
    from harmonica.eval import bootstrap_interval, kid_with_interval

    gen = torch.Generator().manual_seed(1)
    small, large = torch.randn(20, generator=gen), torch.randn(2000, generator=gen)
    low_s, high_s = bootstrap_interval(lambda i: small[i].mean(), 20)
    low_l, high_l = bootstrap_interval(lambda i: large[i].mean(), 2000, resamples=200)
    assert low_s < small.mean() < high_s and low_l < large.mean() < high_l
    assert (high_l - low_l) < 0.3 * (high_s - low_s)
    features, reference = torch.randn(40, 6, generator=gen) + 0.5, torch.randn(50, 6, generator=gen)
    value, (low, high) = kid_with_interval(features, reference, resamples=200)
    assert low < value < high
    with pytest.raises(ValueError, match="bootstrap needs"):
        bootstrap_interval(lambda i: 0.0, 1)
