"""Quality metrics: fidelity to the uncached model and fidelity to the data.

Fidelity to the uncached model compares two batches generated from the same noise and labels
(cached vs uncached), image by image: :func:`mse`, :func:`psnr`, :func:`ssim` (the last two from
torchmetrics). Fidelity to the data compares sets: :func:`fid` is the Fréchet distance between
Gaussian fits of two feature sets, :func:`classifier_fid` applies it to the features of the
reference digits classifier (Inception weights cannot be fetched here), and
:func:`class_accuracy` is the share of class-conditional samples that the classifier assigns
to the class they were asked for.

Images are float ``[B, C, H, W]`` in [-1, 1] (hence ``data_range = 2``). Every metric returns a
0-dim tensor (``reduction="mean"``) or one value per image (``reduction="none"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

__all__ = [
    "bootstrap_interval",
    "class_accuracy",
    "classifier_features",
    "classifier_fid",
    "classifier_kid",
    "fid",
    "kid",
    "kid_with_interval",
    "mean_with_interval",
    "mse",
    "psnr",
    "standardized",
    "ssim",
]

Reduction = Literal["mean", "none"]


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"expected two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"dtype mismatch: {a.dtype} vs {b.dtype}")
    if not a.is_floating_point():
        raise ValueError(f"expected floating-point images, got {a.dtype}")
    if a.dim() != 4 or a.numel() == 0:
        raise ValueError(f"expected non-empty images [B, C, H, W], got shape {tuple(a.shape)}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def mse(a: torch.Tensor, b: torch.Tensor, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error per image, ``mean((a - b)²)`` over C, H, W.

    Args:
        a, b: float ``[B, C, H, W]``, same shape and dtype.
        reduction: ``"mean"`` (average over the batch, 0-dim) or ``"none"`` (``[B]``).

    Returns:
        float32 (float64 for float64 inputs) tensor; computed in at least float32.
    """
    _check_pair(a, b)
    return _reduce((_at_least_fp32(a) - _at_least_fp32(b)).square().mean(dim=(1, 2, 3)), reduction)


def psnr(
    a: torch.Tensor, b: torch.Tensor, *, data_range: float = 2.0, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10·log10(data_range² / mse_i)`` dB, then averaged.

    Built on ``torchmetrics.functional.image.peak_signal_noise_ratio`` with ``dim=(1, 2, 3)``,
    so the mean is over per-image PSNRs (not the PSNR of the batch's pooled MSE). An image pair
    that is identical gives ``inf``.

    Args:
        a, b: float ``[B, C, H, W]``, same shape and dtype.
        data_range: max minus min of the pixel range; 2.0 for images in [-1, 1].
        reduction: ``"mean"`` (0-dim) or ``"none"`` (``[B]``).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(a, b)
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    a, b = _at_least_fp32(a), _at_least_fp32(b)
    values = peak_signal_noise_ratio(a, b, data_range=data_range, dim=(1, 2, 3), reduction="none")
    return _reduce(values, reduction)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 2.0,
    sigma: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Structural similarity per image (Gaussian window), then averaged; 1 for identical images.

    Built on ``torchmetrics.functional.image.structural_similarity_index_measure`` with the
    standard constants (k1 = 0.01, k2 = 0.03). The window is a Gaussian of standard deviation
    ``sigma``, which torchmetrics truncates to ``2·round(3.5σ) + 1`` pixels, and the SSIM map
    is averaged over the positions where the window fits inside the image. The usual σ = 1.5
    (11×11 window) is meant for large images and would leave only the central 6×6 positions of
    a 16×16 image; the default here, σ = 1.0, gives a 9×9 window whose 8×8 central positions
    together cover every pixel of a 16×16 image.

    Args:
        a, b: float ``[B, C, H, W]``, same shape and dtype; H and W larger than the window.
        data_range: max minus min of the pixel range; 2.0 for images in [-1, 1].
        sigma: standard deviation of the Gaussian window in pixels.
        reduction: ``"mean"`` (0-dim) or ``"none"`` (``[B]``).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(a, b)
    window = 2 * int(3.5 * sigma + 0.5) + 1
    if min(a.shape[-2:]) <= window:
        raise ValueError(
            f"images of {tuple(a.shape[-2:])} are too small for a {window}×{window} window (sigma={sigma})"
        )
    a, b = _at_least_fp32(a), _at_least_fp32(b)
    values = structural_similarity_index_measure(
        a, b, gaussian_kernel=True, sigma=sigma, data_range=data_range, reduction="none"
    )
    return _reduce(values, reduction)


def _gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussian fits of two feature sets.

    ``‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})`` with unbiased covariances (divisor
    n − 1), computed in float64. The trace of the matrix square root is taken as
    ``Tr((Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})`` (same eigenvalues), which stays real and symmetric,
    so no complex round-off has to be discarded. For 1-D features it reduces to
    ``(μ_a − μ_b)² + (σ_a − σ_b)²``.

    The estimate is biased upward at small sample counts (a few hundred), so only compare FIDs
    computed with equal numbers of samples; with fewer samples than feature dimensions the
    covariances are rank-deficient and the value is unreliable.

    Args:
        features_a: ``[N_a, D]`` floats, ``N_a >= 2``.
        features_b: ``[N_b, D]`` floats, ``N_b >= 2``, same ``D``.

    Returns:
        0-dim float64 tensor (≥ 0 up to round-off).
    """
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or not f.is_floating_point():
            got = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"{name} must be a float tensor [N, D], got {got}")
        if f.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 samples to fit a covariance, got {f.shape[0]}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    mean_a, cov_a = _gaussian_fit(features_a)
    mean_b, cov_b = _gaussian_fit(features_b.to(features_a.device))
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt


def _polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def _mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> torch.Tensor:
    m, n = k_xx.shape[0], k_yy.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kid(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Kernel distance: the unbiased MMD² between two feature sets with the cubic polynomial kernel
    ``k(x, y) = (x·y / D + 1)³`` (the kernel of KID), in float64.

    Unlike :func:`fid` it is unbiased at any sample count, so values from a hundred samples can be
    compared with each other and with the real-vs-real value (≈ 0; it can go slightly negative).

    Args:
        features_a, features_b: ``[N_a, D]`` and ``[N_b, D]`` floats, N ≥ 2.
    """
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or not f.is_floating_point() or f.shape[0] < 2:
            got = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"{name} must be a float tensor [N >= 2, D], got {got}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    a = features_a.to(torch.float64)
    b = features_b.to(a.device, torch.float64)
    return _mmd2_unbiased(_polynomial_kernel(a, a), _polynomial_kernel(b, b), _polynomial_kernel(a, b))


def bootstrap_interval(
    statistic: Callable[[torch.Tensor], torch.Tensor | float],
    num_samples: int,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``num_samples`` samples.

    ``statistic`` receives the indices of one resample (drawn with replacement, ``[num_samples]``
    int64) and returns a number; e.g. ``lambda i: psnr_per_image[i].mean()``. The interval says how
    much the figure would move with other samples of the same size: differences inside it are noise.
    """
    if num_samples < 2 or resamples < 10 or not 0 < confidence < 1:
        raise ValueError(
            f"bootstrap needs >= 2 samples, >= 10 resamples and a confidence in (0, 1); got "
            f"{num_samples}, {resamples}, {confidence}"
        )
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            float(statistic(torch.randint(0, num_samples, (num_samples,), generator=generator)))
            for _ in range(resamples)
        ],
        dtype=torch.float64,
    )
    tail = (1 - confidence) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def mean_with_interval(values: torch.Tensor, **kwargs) -> tuple[float, tuple[float, float] | None]:
    """The mean of per-sample ``values`` and its :func:`bootstrap_interval` (None if any is infinite,
    e.g. the PSNR of an image identical to its reference)."""
    values = values.detach().double().flatten()
    if not values.isfinite().all():
        return values.mean().item(), None
    return values.mean().item(), bootstrap_interval(lambda i: values[i].mean(), len(values), **kwargs)


def standardized(
    features: torch.Tensor, reference_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets in units of the reference set's per-dimension mean and spread (float64).

    KID's kernel ``(x·y / D + 1)³`` assumes features of order one (Inception's pooled activations);
    the reference classifier's pre-ReLU features are two orders larger, which makes the cubic kernel
    ~10¹² and the MMD pure round-off. Standardising by the reference set keeps the kernel fixed for
    every method compared against that set."""
    b = reference_features.to(torch.float64)
    mean, spread = b.mean(0), b.std(0).clamp_min(1e-12)
    return (features.to(b.device, torch.float64) - mean) / spread, (b - mean) / spread


def kid_with_interval(
    features: torch.Tensor, reference_features: torch.Tensor, *, resamples: int = 1000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """:func:`kid` of ``features`` against ``reference_features``, both :func:`standardized` by the
    reference set, and its bootstrap interval over the generated samples (the kernel matrices are
    computed once and indexed)."""
    a, b = standardized(features, reference_features)
    value = kid(a, b).item()
    k_aa, k_bb, k_ab = _polynomial_kernel(a, a), _polynomial_kernel(b, b), _polynomial_kernel(a, b)

    within_ref = (k_bb.sum() - k_bb.diagonal().sum()) / (k_bb.shape[0] * (k_bb.shape[0] - 1))

    def resampled(index: torch.Tensor) -> float:
        # pairs of copies of one sample are left out, as the diagonal is: k(x, x) would bias it up
        distinct = index[:, None] != index[None, :]
        within = k_aa[index][:, index][distinct].mean()
        return float(within + within_ref - 2 * k_ab[index].mean())

    return value, bootstrap_interval(resampled, a.shape[0], resamples=resamples, seed=seed)


def _classifier_or_default(classifier: nn.Module | None) -> nn.Module:
    if classifier is not None:
        return classifier
    from harmonica.reference import load_classifier

    return load_classifier()


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"expected float images [B, C, H, W] in [-1, 1], got {got}")


@torch.no_grad()
def classifier_features(
    images: torch.Tensor, classifier: nn.Module | None = None, *, batch_size: int = 512
) -> torch.Tensor:
    """FID features of ``images``: the classifier's ``features(x)`` (penultimate, pre-ReLU).

    Args:
        images: float ``[N, 1, 16, 16]`` in [-1, 1] (any device; moved to the classifier's).
        classifier: a model with a ``features`` method; default: the packaged reference
            classifier (:func:`harmonica.reference.load_classifier`).
        batch_size: images per classifier call.

    Returns:
        float32 ``[N, D]`` on the classifier's device.
    """
    _check_images(images)
    model = _classifier_or_default(classifier)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = [
        model.features(images[i : i + batch_size].to(device, torch.float32))
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(chunks).float()


def classifier_fid(
    images_a: torch.Tensor, images_b: torch.Tensor, classifier: nn.Module | None = None
) -> torch.Tensor:
    """:func:`fid` on :func:`classifier_features` of two image sets (float64 0-dim tensor).

    Compare only values computed with the same numbers of images; the real-vs-real floor
    (e.g. train split vs test split at the same counts) is the reference point.
    """
    model = _classifier_or_default(classifier)
    return fid(classifier_features(images_a, model), classifier_features(images_b, model))


def classifier_kid(
    images_a: torch.Tensor, images_b: torch.Tensor, classifier: nn.Module | None = None
) -> torch.Tensor:
    """:func:`kid` on :func:`classifier_features` of two image sets, :func:`standardized` by the second
    (the reference) set (float64 0-dim tensor)."""
    model = _classifier_or_default(classifier)
    return kid(*standardized(classifier_features(images_a, model), classifier_features(images_b, model)))


@torch.no_grad()
def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module | None = None, *, batch_size: int = 512
) -> torch.Tensor:
    """Share of ``images`` that the classifier assigns to ``labels`` (0-dim float32 in [0, 1]).

    Args:
        images: float ``[N, 1, 16, 16]`` in [-1, 1].
        labels: int ``[N]``, the class each image was generated for.
        classifier: default: the packaged reference classifier.
    """
    _check_images(images)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer [N={images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    model = _classifier_or_default(classifier)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predicted = torch.cat(
        [
            model(images[i : i + batch_size].to(device, torch.float32)).argmax(1)
            for i in range(0, len(images), batch_size)
        ]
    )
    model.train(was_training)
    return (predicted.cpu() == labels.cpu()).float().mean()
