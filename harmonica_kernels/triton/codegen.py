"""What the Triton kernels compile to on a GPU target, without a GPU: memory instructions and spills.

``python -m harmonica_kernels.triton.codegen [--arch 90] [--shape B N D]`` compiles every kernel
with the constexprs its launcher picks for the shape (default DiT-XL/2's ``[16, 256, 1152]``), for
fp32 and bf16, and prints per kernel how many global loads and stores there are and how many of
them are 128-bit (``ld.global.v4`` / ``st.global.v4`` in the PTX), the registers per thread and
the bytes spilled (from ``ptxas -v``, with the ptxas triton uses for that target). Pointers and the integer
arguments that are multiples of 16 are specialised as the launcher's JIT would specialise them
for such a shape (16-byte aligned, divisible by 16).

Triton must be imported without ``TRITON_INTERPRET=1`` (the interpreter has no compiler); the
test that checks these figures runs this module in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels

_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_FP32_POINTERS = {"partial_gate_ptr", "partial_r_ptr", "r_ptr", "grad_r_ptr", "coeffs_ptr"}


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    width: int
    config: str
    dtype: str
    loads: int
    v4_loads: int
    narrow_streamed_loads: int  # not 128-bit and not a per-sample vector (those load evict_last)
    stores: int
    v4_stores: int
    registers: int
    spill_stores: int
    spill_loads: int


def _with_forecasts(specs: list[tuple[triton.JITFunction, dict, int, int]]) -> list:
    """``specs`` (the kernels with an ORDER parameter at ORDER 0) plus, for each of those, its
    second-order forecast variant (ORDER 2, no cache write): what forecast_* launch."""
    out = []
    for fn, constexprs, warps, width in specs:
        if "ORDER" not in fn.arg_names:
            out.append((fn, constexprs, warps, width))
            continue
        out.append((fn, {**constexprs, "ORDER": 0}, warps, width))
        out.append((fn, {**constexprs, "WRITE_CACHE": False, "ORDER": 2}, warps, width))
    return out


def kernel_label(fn: triton.JITFunction, constexprs: dict) -> str:
    """The kernel's name, with ``[forecast]`` for its ORDER > 0 variant."""
    return fn.__name__ + ("[forecast]" if constexprs.get("ORDER", 0) else "")


def _specs(B: int, N: int, D: int) -> list[tuple[triton.JITFunction, dict, int, int]]:
    """(kernel, constexprs, num_warps, D) as the launchers pick them for [B, N, D] with a gate; both
    norm kernels: the one the launcher picks for D, and the other one at the nearest width it takes
    (a power of two for the one-tile kernel, 1152 for the chunked one); the kernels that also
    serve the forecast reads at ORDER 0 and 2."""
    _, block_n, block_d, _, warps = kernels.elementwise_config(B, N, D)
    tile = {"HAS_GATE": True, "BLOCK_N": block_n, "BLOCK_D": block_d}
    specs = [
        (kernels._gated_residual_kernel, {**tile, "WRITE_CACHE": True}, warps, D),
        (kernels._routed_gated_residual_kernel, tile, warps, D),
        (
            kernels._routed_gated_residual_backward_kernel,
            {**tile, "BLOCK_R": kernels._SUM_BLOCK_R, "BLOCK_P": kernels._SUM_BLOCK_P},
            warps,
            D,
        ),
    ]
    _, _, _, _, _, chunks = kernels.norm_config(B, N, D)
    norm_widths = (triton.next_power_of_2(D), D) if chunks else (D, 1152)
    for width in norm_widths:
        _, norm_n, norm_d, _, norm_warps, chunks = kernels.norm_config(B, N, width)
        constexprs = {"HAS_GATE": True, "WRITE_CACHE": True, "BLOCK_N": norm_n, "BLOCK_D": norm_d}
        if chunks:
            fn, constexprs = (
                kernels._gated_residual_norm_modulate_chunked_kernel,
                {
                    **constexprs,
                    "NUM_CHUNKS": chunks,
                },
            )
        else:
            fn = kernels._gated_residual_norm_modulate_kernel
        specs.append((fn, constexprs, norm_warps, width))
    return _with_forecasts(specs)


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``."""
    # the ptxas and architecture name (sm_90a for 90) that triton itself uses for this target
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run(
            [ptxas, f"--gpu-name={sm_arch_from_capability(arch)}", "-v", source.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def compile_kernel(fn, constexprs: dict, num_warps: int, dtype: str, arch: int, ints: dict[str, int]):
    """Compile ``fn`` for ``sm_{arch}``; returns its PTX."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "arrivals_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{_TRITON_TYPES[dtype]}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if ints.get(name, 1) % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def _candidate_specs(B: int, N: int, D: int) -> list[tuple[triton.JITFunction, dict, int, int]]:
    """Every autotuning candidate of the tuned kernels (gated, routed, norm) for [B, N, D]."""
    specs = []
    for tile, warps in kernels.TUNING_CANDIDATES:
        _, block_n, block_d, _, num_warps = kernels.elementwise_config(B, N, D, tile, warps)
        constexprs = {"HAS_GATE": True, "BLOCK_N": block_n, "BLOCK_D": block_d}
        specs.append((kernels._gated_residual_kernel, {**constexprs, "WRITE_CACHE": True}, num_warps, D))
        specs.append((kernels._routed_gated_residual_kernel, constexprs, num_warps, D))
        _, norm_n, norm_d, _, norm_warps, chunks = kernels.norm_config(B, N, D, tile, warps)
        constexprs = {"HAS_GATE": True, "WRITE_CACHE": True, "BLOCK_N": norm_n, "BLOCK_D": norm_d}
        if chunks:
            fn, constexprs = (
                kernels._gated_residual_norm_modulate_chunked_kernel,
                {
                    **constexprs,
                    "NUM_CHUNKS": chunks,
                },
            )
        else:
            fn = kernels._gated_residual_norm_modulate_kernel
        specs.append((fn, constexprs, norm_warps, D))
    return _with_forecasts(specs)


def report(
    B: int = 16, N: int = 256, D: int = 1152, arch: int = 90, candidates: bool = False
) -> list[KernelReport]:
    """One row per kernel and dtype as launched by default, or (``candidates``) per autotuning
    candidate of the tuned kernels."""
    if kernels.INTERPRETED:
        raise RuntimeError("under TRITON_INTERPRET=1 the kernels are the interpreter's: unset it to compile")
    # The integer arguments as the launchers pass them: chunk() views of a [B, 6D] adaLN output
    # have batch stride 6D.
    rows = []
    for fn, constexprs, warps, width in (_candidate_specs if candidates else _specs)(B, N, D):
        ints = {"N": N, "D": width}
        ints.update(dict.fromkeys(("gate_stride_b", "shift_stride_b", "scale_stride_b"), 6 * width))
        for dtype in ("float32", "bfloat16"):
            ptx = compile_kernel(fn, constexprs, warps, dtype, arch, ints)
            registers, spill_stores, spill_loads = _ptxas_stats(ptx, arch)
            rows.append(
                KernelReport(
                    kernel=kernel_label(fn, constexprs),
                    width=width,
                    config=" ".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))
                    + f" warps={warps}",
                    dtype=dtype,
                    loads=len(re.findall(r"\bld\.global\.", ptx)),
                    narrow_streamed_loads=sum(
                        "v4" not in op and "evict_last" not in op
                        for op in re.findall(r"\bld\.global\.[^\s;]*", ptx)
                    ),
                    v4_loads=len(re.findall(r"\bld\.global\.[\w.:]*\bv4\.", ptx)),
                    stores=len(re.findall(r"\bst\.global\.", ptx)),
                    v4_stores=len(re.findall(r"\bst\.global\.[\w.:]*\bv4\.", ptx)),
                    registers=registers,
                    spill_stores=spill_stores,
                    spill_loads=spill_loads,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 256, 1152), metavar=("B", "N", "D"))
    parser.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    parser.add_argument("--candidates", action="store_true", help="every autotuning candidate")
    args = parser.parse_args()
    rows = report(*args.shape, arch=args.arch, candidates=args.candidates)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return
    print(f"sm_{args.arch}, shape {list(args.shape)}")
    print("kernel | D | config | dtype | loads (128-bit) | stores (128-bit) | registers | spill bytes")
    for r in rows:
        print(
            f"{r.kernel} | {r.width} | {r.config} | {r.dtype} | {r.loads} ({r.v4_loads}) | "
            f"{r.stores} ({r.v4_stores}) | {r.registers} | {r.spill_stores + r.spill_loads}"
        )


if __name__ == "__main__":
    main()
