"""One-shot GPU check of the CUDA ops in csrc/cuda/ops.cu (needs a CUDA device; nothing here runs
on a CPU-only machine). ``benchmarks/gpu_check.sh`` runs it as one stage of the whole GPU check.

    python benchmarks/gpu_check.py                 # uses harmonica_kernels._C from the install
    python benchmarks/gpu_check.py --so PATH/_C.so # or a freshly built extension
    python benchmarks/gpu_check.py --no-bench      # correctness only (~1 min)

Checks, against harmonica_kernels/reference.py (the oracle), every op over
x dtype x cache dtype (3 x 3), shapes with D = 1152 / 4096 (16-byte path), 37 (scalar path) and 8,
gates None / [B, D] / [B, 1, D] / chunk() views / batch-broadcast / misaligned (scalar fallback),
misaligned x; the forecast reads at orders 0-2 with the history in each cache dtype; the argument
errors; no host synchronisation (sync debug mode "error"); CUDA-graph capture with r and the
forecast coefficients changed between replays. Then times each fused op at a large shape against the
device-to-device copy bandwidth and the unfused torch sequence (targets: >= 85 % of copy
bandwidth, >= 1.8x unfused). Exit status 1 on any correctness failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Both sides compute in fp32 and round once: allow ~2 ulp of the output dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
failures: list[str] = []


def load_reference():
    spec = importlib.util.spec_from_file_location(
        "reference", os.path.join(ROOT, "harmonica_kernels", "reference.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, exact: bool = False) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        failures.append(
            f"{name}: shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
        )
        return
    if exact:
        ok = torch.equal(got, want)
        err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    else:
        diff = (got.float() - want.float()).abs()
        bound = tol * (1 + want.float().abs())
        ok = bool((diff <= bound).all())
        err = diff.max().item() if diff.numel() else 0.0
    if not ok:
        failures.append(f"{name}: max abs err {err:.3g} (tol {tol:g}{', exact' if exact else ''})")


def gates(B: int, D: int, dtype, kind: str):
    dev = "cuda"
    if kind == "none":
        return None
    if kind == "bd":
        return torch.randn(B, D, device=dev, dtype=dtype)
    if kind == "b1d":
        return torch.randn(B, 1, D, device=dev, dtype=dtype)
    if kind == "chunk":  # adaLN output [B, 6D] chunked: stride 6D, offset 2D
        return torch.randn(B, 6 * D, device=dev, dtype=dtype).chunk(6, dim=1)[2]
    if kind == "chunk3":  # [B, 1, 6D] chunked along the last dim
        return torch.randn(B, 1, 6 * D, device=dev, dtype=dtype).chunk(6, dim=-1)[4]
    if kind == "bcast":
        return torch.randn(1, D, device=dev, dtype=dtype)
    if kind == "misaligned":  # storage offset of one element: forces the scalar path
        return torch.randn(B, D + 1, device=dev, dtype=dtype)[:, 1:]
    raise ValueError(kind)


def activation(shape, dtype, misaligned: bool = False) -> torch.Tensor:
    if not misaligned:
        return torch.randn(shape, device="cuda", dtype=dtype)
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + 1, device="cuda", dtype=dtype)[1:].view(shape)


def check_correctness(ref) -> None:
    ops = torch.ops.harmonica
    shapes = [(2, 33, 1152), (3, 17, 37), (1, 5, 4096), (2, 3, 8)]
    gate_kinds = ["none", "bd", "b1d", "chunk", "chunk3", "bcast", "misaligned"]
    n = 0
    for (B, N, D), S, C in itertools.product(shapes, DTYPES, DTYPES):
        tol = TOL[S]
        for gk in gate_kinds:
            misaligned_x = gk == "misaligned" and D == 1152
            tag = f"[{B},{N},{D}] x={S} cache={C} gate={gk}{' x-misaligned' if misaligned_x else ''}"
            x = activation((B, N, D), S, misaligned_x)
            branch = torch.randn(B, N, D, device="cuda", dtype=S)
            cache = torch.randn(B, N, D, device="cuda", dtype=C)
            g = gates(B, D, S, gk)
            r = torch.rand((), device="cuda")

            close(
                f"cached {tag}",
                ops.cached_gated_residual(x, g, cache),
                ref.cached_gated_residual(x, g, cache),
                tol,
            )

            c_k, c_r = cache.clone(), cache.clone()
            out_k = ops.gated_residual_update_(x, g, branch, c_k)
            out_r = ref.gated_residual_update_(x, g, branch, c_r)
            close(f"update.out {tag}", out_k, out_r, tol)
            close(f"update.cache {tag}", c_k, c_r, 0, exact=True)

            close(
                f"routed {tag}",
                ops.routed_gated_residual(x, g, branch, cache, r),
                ref.routed_gated_residual(x, g, branch, cache, r),
                tol,
            )

            go = torch.randn(B, N, D, device="cuda", dtype=S)
            for r_b in (r, r.reshape(1).double(), r.reshape(1, 1).to(S)):
                got = ops.routed_gated_residual_backward(go, g, branch, cache, r_b)
                want = ref.routed_gated_residual_backward(go, g, branch, cache, r_b)
                close(f"bwd.grad_branch {tag}", got[0], want[0], tol)
                if g is None:
                    if got[1].numel() != 0:
                        failures.append(f"bwd.grad_gate {tag}: expected an empty tensor")
                else:
                    # sums over N tokens (and B): fp32 order differences, then one rounding
                    close(f"bwd.grad_gate {tag}", got[1], want[1], max(tol, 1e-4))
                close(
                    f"bwd.grad_r {tag} r={r_b.dtype}{tuple(r_b.shape)}",
                    got[2],
                    want[2],
                    max(TOL[r_b.dtype] if r_b.dtype in TOL else 0, 1e-4),
                )

            shift = gates(B, D, S, "chunk" if gk != "none" else "bd")
            scale = gates(B, D, S, gk if gk not in ("none",) else "b1d")
            y = torch.randn(B, N, D, device="cuda", dtype=S)
            for variant in ("y", "y+cache", "reuse"):
                c_k, c_r = cache.clone(), cache.clone()
                yy = None if variant == "reuse" else y
                cc = None if variant == "y" else (c_k, c_r)
                got = ops.gated_residual_norm_modulate(
                    x, g, yy, shift, scale, 1e-6, cc and cc[0], variant == "reuse"
                )
                want = ref.gated_residual_norm_modulate(
                    x, g, yy, shift, scale, 1e-6, cc and cc[1], variant == "reuse"
                )
                close(f"norm.x_out {variant} {tag}", got[0], want[0], tol)
                close(f"norm.h {variant} {tag}", got[1], want[1], max(tol, 1e-4) * 2)
                if cc is not None:
                    close(f"norm.cache {variant} {tag}", c_k, c_r, 0, exact=True)

            # Forecast reads: history (cache, c1, c2) in the cache dtype, coefficients on the device.
            c1, c2 = (torch.randn(B, N, D, device="cuda", dtype=C) for _ in range(2))
            coeffs = torch.tensor([0.7, -0.3], device="cuda")
            for order, (h1, h2) in enumerate(((None, None), (c1, None), (c1, c2))):
                close(
                    f"forecast order {order} {tag}",
                    ops.forecast_gated_residual(x, g, cache, h1, h2, coeffs),
                    ref.forecast_gated_residual(x, g, cache, h1, h2, coeffs),
                    tol,
                )
                got = ops.forecast_residual_norm_modulate(x, g, cache, h1, h2, coeffs, shift, scale, 1e-6)
                want = ref.forecast_residual_norm_modulate(x, g, cache, h1, h2, coeffs, shift, scale, 1e-6)
                close(f"forecast_norm.x_out order {order} {tag}", got[0], want[0], tol)
                close(f"forecast_norm.h order {order} {tag}", got[1], want[1], max(tol, 1e-4) * 2)
            n += 1
    torch.cuda.synchronize()
    print(f"correctness: {n} configurations x 7 ops")


def check_errors() -> None:
    ops = torch.ops.harmonica
    x = torch.randn(2, 4, 64, device="cuda")
    s = torch.randn(2, 64, device="cuda")
    cache = torch.randn_like(x)
    coeffs = torch.tensor([0.5, 0.25], device="cuda")
    cases = {
        "reuse without cache": lambda: ops.gated_residual_norm_modulate(x, s, None, s, s, 1e-6, None, True),
        "reuse with y": lambda: ops.gated_residual_norm_modulate(x, s, x, s, s, 1e-6, cache, True),
        "no y without reuse": lambda: ops.gated_residual_norm_modulate(x, s, None, s, s, 1e-6, cache, False),
        "cache aliases x": lambda: ops.gated_residual_update_(x, s, torch.randn_like(x), x),
        "cpu cache": lambda: ops.cached_gated_residual(x, s, cache.cpu()),
        "gate wrong D": lambda: ops.cached_gated_residual(x, torch.randn(2, 63, device="cuda"), cache),
        "r two elements": lambda: ops.routed_gated_residual(x, s, x, cache, torch.rand(2, device="cuda")),
        "int x": lambda: ops.cached_gated_residual(x.int(), None, cache),
        "forecast c2 without c1": lambda: ops.forecast_gated_residual(x, s, cache, None, cache, coeffs),
        "forecast coeffs on cpu": lambda: ops.forecast_gated_residual(x, s, cache, cache, None, coeffs.cpu()),
        "forecast coeffs fp64": lambda: ops.forecast_gated_residual(
            x, s, cache, cache, None, coeffs.double()
        ),
        "forecast c0 aliases x": lambda: ops.forecast_residual_norm_modulate(
            x, s, x, cache, None, coeffs, s, s, 1e-6
        ),
    }
    for name, fn in cases.items():
        try:
            fn()
        except RuntimeError as e:
            print(f"error ok: {name}: {str(e).splitlines()[0][:120]}")
        else:
            failures.append(f"error expected but none raised: {name}")


def check_no_sync_and_graphs() -> None:
    ops = torch.ops.harmonica
    B, N, D = 2, 64, 1152
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
    branch, y = torch.randn_like(x), torch.randn_like(x)
    cache = torch.randn_like(x)
    cache_norm = torch.randn_like(x)  # written by the norm op; `cache` is re-read after replays
    ada = torch.randn(B, 6 * D, device="cuda", dtype=torch.bfloat16).chunk(6, dim=1)
    r = torch.full((), 0.3, device="cuda")
    grad = torch.randn_like(x)
    c1, c2 = torch.randn_like(x), torch.randn_like(x)
    coeffs = torch.tensor([0.5, 0.25], device="cuda")
    forecasts = {}

    def run_all():
        ops.cached_gated_residual(x, ada[2], cache)
        ops.gated_residual_update_(x, ada[2], branch, cache)
        o = ops.routed_gated_residual(x, ada[2], branch, cache, r)
        ops.routed_gated_residual_backward(grad, ada[2], branch, cache, r)
        ops.gated_residual_norm_modulate(x, ada[2], y, ada[3], ada[4], 1e-6, cache_norm, False)
        forecasts["gated"] = ops.forecast_gated_residual(x, ada[2], cache, c1, c2, coeffs)
        forecasts["norm"] = ops.forecast_residual_norm_modulate(
            x, ada[2], cache, c1, None, coeffs, ada[3], ada[4], 1e-6
        )
        return o

    run_all()  # warm-up: occupancy queries, lazy module loading
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_all()
        print("no host sync: ok")
    except RuntimeError as e:
        failures.append(f"host sync detected: {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_all()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_all()
    for rv in (0.0, 0.7, 1.0):
        r.fill_(rv)
        graph.replay()
        torch.cuda.synchronize()
        want = ops.routed_gated_residual(x, ada[2], branch, cache, r)
        if not torch.equal(out, want):
            failures.append(f"graph replay with r={rv} differs from eager")
    for a, b in ((0.0, 0.0), (1.0, -0.5), (2.0, 1.0)):  # the coefficients live on the device
        coeffs.copy_(torch.tensor([a, b]))
        graph.replay()
        torch.cuda.synchronize()
        want_gated = ops.forecast_gated_residual(x, ada[2], cache, c1, c2, coeffs)
        want_norm = ops.forecast_residual_norm_modulate(
            x, ada[2], cache, c1, None, coeffs, ada[3], ada[4], 1e-6
        )
        if not torch.equal(forecasts["gated"], want_gated) or not all(
            torch.equal(got, want) for got, want in zip(forecasts["norm"], want_norm, strict=True)
        ):
            failures.append(f"graph replay with coeffs=({a}, {b}) differs from eager")
    print("cuda graph capture/replay: done")


def timeit(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def bench_shape(B: int, N: int, D: int, S: torch.dtype, copy_bw: float) -> None:
    ops = torch.ops.harmonica
    e = B * N * D * torch.finfo(S).bits // 8
    x = torch.randn(B, N, D, device="cuda", dtype=S)
    branch, y, cache, grad = (torch.randn_like(x) for _ in range(4))
    ada = torch.randn(B, 6 * D, device="cuda", dtype=S).chunk(6, dim=1)
    gate, shift, scale = ada[2], ada[3], ada[4]
    g3 = gate.unsqueeze(1)
    r = torch.full((), 0.3, device="cuda")
    rr = r.to(S)
    c1, c2 = torch.randn_like(x), torch.randn_like(x)
    coeffs = torch.tensor([0.5, 0.25], device="cuda")

    def unfused_forecast2():
        return x + g3 * (cache + 0.5 * (cache - c1) + 0.25 * (cache - 2 * c1 + c2))

    def unfused_norm():
        xo = x + g3 * y
        cache.copy_(y)
        return xo, F.layer_norm(xo, (D,), eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def unfused_bwd():
        gg = grad * g3
        mixed = torch.lerp(cache, branch, rr)
        return gg * rr, (grad * mixed).sum(1), (gg * (branch - cache)).sum()

    cases = [
        (
            "cached_gated_residual",
            3 * e,
            lambda: ops.cached_gated_residual(x, gate, cache),
            lambda: x + g3 * cache,
        ),
        (
            "gated_residual_update_",
            4 * e,
            lambda: ops.gated_residual_update_(x, gate, branch, cache),
            lambda: (x + g3 * branch, cache.copy_(branch)),
        ),
        (
            "routed_gated_residual",
            4 * e,
            lambda: ops.routed_gated_residual(x, gate, branch, cache, r),
            lambda: x + g3 * torch.lerp(cache, branch, rr),
        ),
        (
            "routed_..._backward",
            4 * e,
            lambda: ops.routed_gated_residual_backward(grad, gate, branch, cache, r),
            unfused_bwd,
        ),
        (
            "norm_modulate(y,cache)",
            5 * e,
            lambda: ops.gated_residual_norm_modulate(x, gate, y, shift, scale, 1e-6, cache, False),
            unfused_norm,
        ),
        (
            "norm_modulate(reuse)",
            4 * e,
            lambda: ops.gated_residual_norm_modulate(x, gate, None, shift, scale, 1e-6, cache, True),
            None,
        ),
        (
            "forecast(order 1)",
            4 * e,
            lambda: ops.forecast_gated_residual(x, gate, cache, c1, None, coeffs),
            lambda: x + g3 * (cache + 0.5 * (cache - c1)),
        ),
        (
            "forecast(order 2)",
            5 * e,
            lambda: ops.forecast_gated_residual(x, gate, cache, c1, c2, coeffs),
            unfused_forecast2,
        ),
        (
            "forecast_norm(order 2)",
            6 * e,
            lambda: ops.forecast_residual_norm_modulate(x, gate, cache, c1, c2, coeffs, shift, scale, 1e-6),
            lambda: (
                F.layer_norm(unfused_forecast2(), (D,), eps=1e-6) * (1 + scale.unsqueeze(1))
                + shift.unsqueeze(1)
            ),
        ),
    ]
    for name, nbytes, fused, unfused in cases:
        tf = timeit(fused)
        tu = timeit(unfused) if unfused is not None else float("nan")
        bw = nbytes / tf
        print(
            f"{name:24s} {str((B, N, D)):17s} {str(S)[6:]:9s} {tf * 1e6:8.1f} {bw / 1e9:7.0f} "
            f"{100 * bw / copy_bw:5.0f}% {tu * 1e6:10.1f} {tu / tf:6.2f}x"
        )


def copy_bandwidth() -> float:
    src = torch.empty(1 << 28, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timeit(lambda: dst.copy_(src))


def bench() -> None:
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bw / 1e9:.0f} GB/s")
    print(f"{'op':24s} {'shape':17s} {'dtype':9s} {'us':>8s} {'GB/s':>7s} {'%copy':>6s}", end=" ")
    print(f"{'unfused us':>10s} {'speedup':>7s}")
    for (B, N, D), S in itertools.product(
        [(8, 4096, 1152), (2, 4096, 1152), (2, 256, 1152)], (torch.bfloat16, torch.float16)
    ):
        bench_shape(B, N, D, S, copy_bw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--so", help="path of a built harmonica_kernels/_C*.so to load")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    if args.so:
        torch.ops.load_library(args.so)
    else:
        import harmonica_kernels._C  # noqa: F401  (registers the ops)
    torch.manual_seed(0)
    ref = load_reference()
    check_correctness(ref)
    check_no_sync_and_graphs()
    check_errors()  # last: a direct call that crashes instead of raising must not hide the rest
    for f in failures[:50]:
        print("FAIL", f)
    print(f"{len(failures)} failures")
    if not args.no_bench:
        bench()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
