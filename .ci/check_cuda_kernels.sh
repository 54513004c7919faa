#!/usr/bin/env bash
# Compiles every CUDA kernel source (csrc/cuda/*.cu) for Ampere (sm_80) and Hopper (sm_90),
# with the defines torch's CUDAExtension adds, so kernel code is checked even on machines
# without a GPU or a CUDA build of torch. Exits non-zero on any compile error or warning;
# skips (exit 0) when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: skipping the CUDA compile check"
  exit 0
fi

out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

flags=(
  -c -O3 -std=c++17 -I csrc
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr
  --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
)

echo "$(nvcc --version | tail -n 1)"
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "no CUDA sources under csrc/cuda" >&2
  exit 1
fi
for source in "${sources[@]}"; do
  echo "nvcc: $source (sm_80, sm_90)"
  nvcc "${flags[@]}" "$source" -o "$out_dir/$(basename "$source" .cu).o"
done
echo "CUDA compile check passed: ${#sources[@]} file(s)"
