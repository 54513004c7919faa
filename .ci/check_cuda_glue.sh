#!/usr/bin/env bash
# Compiles the torch glue of the CUDA backend (csrc/cuda/backend.cpp, and csrc/ops.cpp as a CUDA
# build sees it) against the installed torch's CUDA headers, so that a change to the layer loop
# or the Backend interface that the CUDA backend no longer fits fails CI without a GPU or a CUDA
# build of torch. The CPU wheel ships those headers; the CUDA toolkit here lacks cuBLAS,
# cuSPARSE and cuSOLVER, for which .ci/cuda_glue holds stand-in declarations (compile only,
# nothing is linked). Skips (exit 0) when nvcc, and so the CUDA runtime headers, are absent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: skipping the CUDA glue compile check"
  exit 0
fi
# The include directory nvcc itself uses (nvcc may be a wrapper script, so ask it).
cuda_include="$(nvcc -x cu -E --dryrun /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/ *$//')"
if [ ! -f "$cuda_include/cuda_runtime_api.h" ]; then
  echo "no CUDA runtime headers next to nvcc ($cuda_include): skipping the CUDA glue compile check"
  exit 0
fi

# torch's and Python's include directories (as system headers: their warnings are not ours) and
# the C++ standard torch's extensions are built with.
mapfile -t torch_flags < <(python - <<'PY'
import inspect, re, sysconfig
import torch.utils.cpp_extension as ext
for path in ext.include_paths() + [sysconfig.get_paths()["include"]]:
    print("-isystem" + path)
standards = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(ext))
print("-std=c++" + (max(standards, key=int) if standards else "17"))
PY
)

flags=(
  -c -O0 -fopenmp "${torch_flags[@]}" -isystem .ci/cuda_glue -I "$cuda_include"
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DFUSED_RNN_WITH_CUDA -DTORCH_EXTENSION_NAME=_C
  -Wall -Wextra -Werror -Wno-unused-parameter
)
out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT
for source in csrc/cuda/backend.cpp csrc/ops.cpp; do
  echo "g++: $source (CUDA build)"
  g++ "${flags[@]}" "$source" -o "$out_dir/$(basename "$source" .cpp).o"
done
echo "CUDA glue compile check passed"
