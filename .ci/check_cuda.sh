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

OUT_DIR=$(mktemp -d /tmp/harmonica_check_cuda.XXXXXX)
trap 'rm -rf "$OUT_DIR"' EXIT

echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "check_cuda: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') headers; archs: ${CUDA_CHECK_ARCHS:-80 90}"
status=0
for src in "${SOURCES[@]}"; do
  obj="$OUT_DIR/$(basename "${src%.cu}").o"
  start=$(date +%s)
  echo "check_cuda: compiling $src"  # compile-only, object discarded
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
