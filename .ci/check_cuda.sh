#!/usr/bin/env bash
# Compile-only check of the CUDA ops (csrc/cuda/*.cu) on a machine without a GPU.
#
# Uses the flags torch's BuildExtension/CUDAExtension passes to nvcc (COMMON_NVCC_FLAGS, -fPIC,
# -DTORCH_EXTENSION_NAME, -DTORCH_API_INCLUDE_EXTENSION_H, torch's include dirs) plus setup.py's
# own nvcc flags, for sm_80 and sm_90. The installed torch may be a CPU build: its headers
# include the c10/cuda and ATen/cuda headers we need.
#
# Environment:
#   CUDA_HOME            toolkit root (default /usr/local/cuda; nvcc from PATH if absent there)
#   PYTHON               interpreter whose torch supplies the headers (default python3)
#   CUDA_CHECK_ARCHS     space-separated compute capabilities (default "80 90")
#   CUDA_CHECK_VERBOSE=1 print ptxas register/spill usage per kernel
#   CUDA_CHECK_KEEP=DIR  keep the objects in DIR (e.g. for `cuobjdump -sass DIR/ops.o`)
#   CUDA_CHECK_COMPILE=0 skip the compile-only step
#   CUDA_CHECK_LINK=1    also build the whole extension against a CUDA torch (venv below, created
#                        on first use: ~5.5 GB, CUDA_LINK_TORCH, default torch==2.14.1, a cu130
#                        wheel), load it, check every op has a CPU and a CUDA kernel (the
#                        dispatcher rejects mismatched C++ signatures at load time) and that the
#                        sm_90 code uses 128-bit global loads/stores. ~10-15 min on 2 cores.
#   CUDA_LINK_VENV       venv for the link step (default /tmp/harmonica_cuvenv)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [[ -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  NVCC=$(command -v nvcc)
else
  echo "check_cuda: FAIL: nvcc not found (looked in $CUDA_HOME/bin and PATH)" >&2
  exit 1
fi

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda: FAIL: no csrc/cuda/*.cu found" >&2
  exit 1
fi

# torch include dirs, Python include dir, and the nvcc defines torch's extension builder adds.
mapfile -t TORCH_FLAGS < <("$PYTHON" - <<'PY'
import sysconfig
from torch.utils import cpp_extension as ce
for p in ce.include_paths():
    print("-isystem"); print(p)
print("-isystem"); print(sysconfig.get_path('include', scheme='posix_prefix'))
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
PY
)
# A CPU build of torch ships the c10/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters
# on Windows alone); tell CUDAMacros.h to skip it.
TORCH_INCLUDE=$("$PYTHON" -c 'from torch.utils import cpp_extension as ce; print(ce.include_paths()[0])')
if [[ ! -f "$TORCH_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  echo "check_cuda: torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU build): adding -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
  TORCH_FLAGS+=("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
fi

GENCODE=()
for cc in ${CUDA_CHECK_ARCHS:-80 90}; do
  GENCODE+=("-gencode" "arch=compute_${cc},code=sm_${cc}")
done

EXTRA=()
if [[ "${CUDA_CHECK_VERBOSE:-0}" == "1" ]]; then
  EXTRA+=("-Xptxas" "-v,-warn-spills")
fi

if [[ -n "${CUDA_CHECK_KEEP:-}" ]]; then
  OUT_DIR=$CUDA_CHECK_KEEP
  mkdir -p "$OUT_DIR"
else
  OUT_DIR=$(mktemp -d /tmp/harmonica_check_cuda.XXXXXX)
  trap 'rm -rf "$OUT_DIR"' EXIT
fi

echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "check_cuda: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') headers; archs: ${CUDA_CHECK_ARCHS:-80 90}"
status=0
if [[ "${CUDA_CHECK_COMPILE:-1}" != "0" ]]; then
  for src in "${SOURCES[@]}"; do
    obj="$OUT_DIR/$(basename "${src%.cu}").o"
    start=$(date +%s)
    echo "check_cuda: compiling $src"
    if "$NVCC" -c "$src" -o "$obj" \
        "${TORCH_FLAGS[@]}" -Icsrc \
        -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
        --compiler-options '-fPIC' \
        -O3 -std=c++20 --use_fast_math -lineinfo \
        "${GENCODE[@]}" "${EXTRA[@]}"; then
      echo "check_cuda: OK   $src ($(( $(date +%s) - start )) s, $(stat -c %s "$obj") bytes)"
    else
      echo "check_cuda: FAIL $src" >&2
      status=1
    fi
  done
  if [[ $status -ne 0 ]]; then
    echo "check_cuda: FAILED" >&2
    exit 1
  fi
  echo "check_cuda: all ${#SOURCES[@]} CUDA source(s) compiled"
fi

if [[ "${CUDA_CHECK_LINK:-0}" == "1" ]]; then
  VENV=${CUDA_LINK_VENV:-/tmp/harmonica_cuvenv}
  if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
    echo "check_cuda: creating $VENV with ${CUDA_LINK_TORCH:-torch==2.14.1}"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q "${CUDA_LINK_TORCH:-torch==2.14.1}" setuptools wheel ninja pybind11 numpy
  fi
  # Build in a copy so the checkout's own (CPU) build is left alone.
  BUILD_DIR="$OUT_DIR/link"
  mkdir -p "$BUILD_DIR"
  tar --exclude=./build --exclude=./.git --exclude='*.so' --exclude='*.egg-info' --exclude=__pycache__ \
    -cf - . | tar -xf - -C "$BUILD_DIR"
  start=$(date +%s)
  echo "check_cuda: building the extension against $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') in $BUILD_DIR"
  (cd "$BUILD_DIR" && FORCE_CUDA=1 CUDA_HOME="$CUDA_HOME" MAX_JOBS="${MAX_JOBS:-1}" \
    "$VENV/bin/python" setup.py -q build_ext --inplace)
  echo "check_cuda: built in $(( $(date +%s) - start )) s"
  "$VENV/bin/python" - "$BUILD_DIR" <<'PY'
import glob, os, re, subprocess, sys
import torch
so = glob.glob(os.path.join(sys.argv[1], "harmonica_kernels", "_C*.so"))
assert len(so) == 1, so
torch.ops.load_library(so[0])  # raises on a C++ signature mismatch between backends
ops = ["cached_gated_residual", "gated_residual_update_", "routed_gated_residual",
       "routed_gated_residual_backward", "gated_residual_norm_modulate", "forecast_gated_residual",
       "forecast_residual_norm_modulate"]
missing = [(op, key) for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"harmonica::{op}", key)]
assert not missing, f"ops without a kernel: {missing}"
print(f"check_cuda: {so[0]} loads; {len(ops)} ops have CPU and CUDA kernels")
cuobjdump = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
if not os.path.exists(cuobjdump):
    try:
        import triton
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        pass
if os.path.exists(cuobjdump):
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", so[0]], check=True,
                          capture_output=True, text=True).stdout
    n_ld, n_st = len(re.findall(r"LDG\.E\.128", sass)), len(re.findall(r"STG\.E\.128", sass))
    n_fn = sass.count("Function :")
    print(f"check_cuda: sm_90: {n_fn} kernels, {n_ld} LDG.E.128, {n_st} STG.E.128")
    assert n_ld > 0 and n_st > 0, "no 128-bit global loads/stores in the sm_90 code"
else:
    print("check_cuda: no cuobjdump found; SASS check skipped")
PY
  echo "check_cuda: link check passed"
fi
