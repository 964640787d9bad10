"""Which path a public call takes: eager calls reach the backend directly after one validation;
traced and differentiable calls go through the registered ops."""

from __future__ import annotations

import pytest
import torch

import harmonica_kernels as hk
from harmonica_kernels import _backend
from harmonica_kernels import reference as ref

from .test_ops import close, make_inputs

SHAPE = (2, 5, 24)


def _op_events(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("harmonica::")}


def _count_calls(monkeypatch, module, names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def test_triton_eager_calls_skip_the_registered_op_and_its_checks(monkeypatch):
    if "triton" not in hk.available_backends():
        pytest.skip(f"backend triton unavailable: {hk.missing_backends()['triton']}")
    from harmonica_kernels.triton import ops as triton_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, gate, branch, cache = make_inputs(SHAPE, torch.float32, torch.float32, "chunk", device)
    checks = _count_calls(monkeypatch, triton_ops, ["_check_x", "_check_like_x", "_row_vector_batch_stride"])
    with hk.use_backend("triton"):
        events = _op_events(lambda: hk.gated_residual_update_(x, gate, branch, cache))
        out = hk.cached_gated_residual(x, gate, cache)
    assert not events, events
    assert not any(checks.values()), f"the backend validated again: {checks}"
    close(out, ref.cached_gated_residual(x, gate, cache))


def test_differentiable_calls_use_the_registered_op():
    """With a gradient to carry, the call goes through the op that autograd knows."""
    if "triton" not in hk.available_backends():
        pytest.skip(f"backend triton unavailable: {hk.missing_backends()['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, gate, branch, cache = make_inputs(SHAPE, torch.float32, torch.float32, "chunk", device)
    r = torch.tensor(0.25, device=device, requires_grad=True)
    with hk.use_backend("triton"):
        events = _op_events(lambda: hk.routed_gated_residual(x, gate, branch, cache, r).sum().backward())
        with torch.no_grad():
            no_grad_events = _op_events(lambda: hk.routed_gated_residual(x, gate, branch, cache, r))
    assert "harmonica::triton_routed_gated_residual" in events
    assert not no_grad_events, no_grad_events
    assert r.grad is not None and torch.isfinite(r.grad)


@pytest.mark.parametrize("op", ["cached", "update", "norm_reuse"])
def test_inputs_the_op_does_not_take_are_normalised(backend, device, op):
    """A C++ op rejects a non-contiguous x or a gate strided along D; the public function then
    validates, makes them contiguous and calls again (the same holds on every backend)."""
    x, gate, branch, cache = make_inputs(SHAPE, torch.float32, torch.float32, "bd", device)
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    gate_strided = torch.stack([gate, gate], dim=-1)[..., 0]
    assert not x_strided.is_contiguous() and gate_strided.stride(-1) != 1
    shift, scale = gate.flip(0), gate.flip(1)
    if op == "cached":
        actual = hk.cached_gated_residual(x_strided, gate_strided, cache)
        expected = ref.cached_gated_residual(x, gate, cache)
    elif op == "update":
        expected = ref.gated_residual_update_(x, gate, branch, cache.clone())
        actual = hk.gated_residual_update_(x_strided, gate_strided, branch, cache)
        torch.testing.assert_close(cache, branch, atol=0, rtol=0)
    else:
        actual = hk.gated_residual_norm_modulate(
            x_strided, gate_strided, None, shift, scale, cache=cache, reuse=True
        )[1]
        expected = ref.gated_residual_norm_modulate(x, gate, None, shift, scale, 1e-6, cache, True)[1]
    close(actual, expected)


def test_fast_path_follows_set_backend():
    """The per-device eager table is refreshed when the backend changes."""
    with hk.use_backend("torch"):
        assert _backend.eager_for[0] is ref and _backend.self_checked[0] is None
    if "cpp" in hk.available_backends():
        with hk.use_backend("cpp"):
            assert _backend.self_checked[0] is _backend.eager_for[0] is not None
    default = hk.get_backend("cpu")
    assert (_backend.self_checked[0] is not None) == (default in ("cpp", "cuda"))


def test_autotuning_keeps_the_fastest_candidate(monkeypatch):
    """The tuning logic without a GPU: do_bench faked, the interpreter flag lifted."""
    kernels = pytest.importorskip("harmonica_kernels.triton.kernels")
    import triton.testing

    candidates = kernels.TUNING_CANDIDATES
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(kernels, "_AUTOTUNE", True)
    monkeypatch.setattr(kernels, "_tuned", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    milliseconds = dict(zip(candidates, [3.0, 1.0, 2.0][: len(candidates)], strict=True))
    launched: list[tuple] = []

    def fake_do_bench(fn, warmup, rep):
        fn()
        return milliseconds[launched[-1]]

    def launch(tile, warps):
        launched.append((tile, warps))

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    fastest = min(milliseconds, key=milliseconds.get)
    assert kernels._tuned_choice(("op", 1), launch) == fastest
    assert sorted(launched) == sorted(candidates)
    launched.clear()
    assert kernels._tuned_choice(("op", 1), launch) == fastest and not launched, "memoised per key"

    # During CUDA-graph capture: the default, and tuned on a later call.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert kernels._tuned_choice(("op", 2), launch) == candidates[0] and not launched
    assert ("op", 2) not in kernels._tuned

    # A failing benchmark never fails the op: the default, with a warning.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def broken_do_bench(fn, warmup, rep):
        raise RuntimeError("no device")

    monkeypatch.setattr(triton.testing, "do_bench", broken_do_bench)
    with pytest.warns(UserWarning, match="autotuning failed"):
        assert kernels._tuned_choice(("op", 3), launch) == candidates[0]


def test_triton_backward_is_one_launch_and_no_torch_kernels(monkeypatch):
    """The routed op's backward on Triton is one kernel (its last arrivals reduce the partials and
    cast); apart from allocating its outputs, no torch op (each would be another launch). It leaves
    its arrival counters at zero, and a second call gives the same bits."""
    kernels = pytest.importorskip("harmonica_kernels.triton.kernels")
    from torch.utils._python_dispatch import TorchDispatchMode

    from harmonica_kernels.triton import ops as triton_ops

    launched: list[str] = []
    in_kernel = [False]

    class Counted:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(self.fn.__name__)
                in_kernel[0] = True  # the interpreter's own tensor handling is not ours
                try:
                    return self.fn[grid](*args, **kwargs)
                finally:
                    in_kernel[0] = False

            return run

    name = "_routed_gated_residual_backward_kernel"
    monkeypatch.setattr(kernels, name, Counted(getattr(kernels, name)))

    class TorchOps(TorchDispatchMode):
        ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not in_kernel[0] and not func.is_view and func.__name__.split(".")[0] not in _ALLOCATIONS:
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, gate, branch, cache = make_inputs((3, 70, 300), torch.bfloat16, torch.bfloat16, "chunk", device)
    r = torch.tensor(0.3, device=device)
    triton_ops.routed_gated_residual_backward(x, gate, branch, cache, r)  # counters allocated
    launched.clear()
    with TorchOps() as mode:
        grads = triton_ops.routed_gated_residual_backward(x, gate, branch, cache, r)
    assert launched == [name]
    assert not mode.ops, mode.ops
    assert all(not counters.any() for counters in kernels._arrival_counters.values())
    second = triton_ops.routed_gated_residual_backward(x, gate, branch, cache, r)
    for again, first in zip(second, grads, strict=True):
        assert torch.equal(again, first)
    for actual, expected in zip(
        grads, ref.routed_gated_residual_backward(x, gate, branch, cache, r), strict=True
    ):
        close(actual.float(), expected.float(), torch.bfloat16 if actual.numel() > 1 else torch.float16)


_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the arrivals race only on a GPU")
@pytest.mark.parametrize("gate_kind", ["chunk", "broadcast"])
def test_triton_backward_arrivals_hold_under_repetition_and_streams(gate_kind):
    """The one-launch backward's last arrivals on a GPU: a grid of hundreds of programs, run again
    and again on one stream and on two at once (each stream has its own counters), always gives the
    first call's bits, close to the reference; a captured graph replays them too."""
    pytest.importorskip("triton")
    from harmonica_kernels.triton import ops as triton_ops

    x, gate, branch, cache = make_inputs((8, 300, 1152), torch.bfloat16, torch.bfloat16, gate_kind, "cuda")
    r = torch.tensor(0.3, device="cuda")
    first = triton_ops.routed_gated_residual_backward(x, gate, branch, cache, r)
    for actual, expected in zip(
        first, ref.routed_gated_residual_backward(x, gate, branch, cache, r), strict=True
    ):
        close(actual.float(), expected.float(), torch.bfloat16 if actual.numel() > 1 else torch.float16)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    runs = []
    for _ in range(50):
        runs.append(triton_ops.routed_gated_residual_backward(x, gate, branch, cache, r))
        for stream in streams:
            with torch.cuda.stream(stream):
                runs.append(triton_ops.routed_gated_residual_backward(x, gate, branch, cache, r))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_ops.routed_gated_residual_backward(x, gate, branch, cache, r)
    for _ in range(20):
        graph.replay()
        runs.append(tuple(t.clone() for t in captured))
    torch.cuda.synchronize()
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(run, first, strict=True))
