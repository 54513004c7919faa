#!/usr/bin/env bash
# Compiles every CUDA kernel source (csrc/cuda/*.cu) for Ampere (sm_80) and Hopper (sm_90),
# with the defines torch's CUDAExtension adds, so kernel code is checked even on machines
# without a GPU or a CUDA build of torch. Exits non-zero on any compile error or warning, and
# on a persistent kernel that spills registers or needs a stack frame (their loops must keep
# everything in registers and shared memory); prints each persistent kernel's registers.
# Skips (exit 0) when nvcc is not installed.
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
  -Xptxas -v
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
  report="$out_dir/$(basename "$source" .cu).ptxas"
  nvcc "${flags[@]}" "$source" -o "$out_dir/$(basename "$source" .cu).o" 2>"$report" || { cat "$report" >&2; exit 1; }
  # ptxas reports, per kernel and architecture: "Compiling entry function '<name>' for 'sm_XX'",
  # then its stack frame and spills, then its registers.
  python3 - "$report" <<'PY'
import re, subprocess, sys

def demangle(names):
    try:
        return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                              check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return names

kernels, current = [], None
for line in open(sys.argv[1]):
    entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if entry:
        current = {"name": entry.group(1), "arch": entry.group(2)}
        kernels.append(current)
        continue
    if current is None:
        continue
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if frame:
        current["stack"], current["spill_stores"], current["spill_loads"] = map(int, frame.groups())
    registers = re.search(r"Used (\d+) registers", line)
    if registers:
        current["registers"] = int(registers.group(1))
bad = []
for kernel, readable in zip(kernels, demangle([k["name"] for k in kernels])):
    if "persistent" not in readable:
        continue
    short = re.sub(r"fused_rnn::|persistent::|\(anonymous namespace\)::|\(.*", "", readable)
    print(f"  {kernel['arch']} {short}: {kernel.get('registers', '?')} registers, "
          f"{kernel.get('stack', '?')} B stack, {kernel.get('spill_stores', '?')} B spilled")
    if kernel.get("stack", 1) or kernel.get("spill_stores", 1) or kernel.get("spill_loads", 1):
        bad.append(short)
if bad:
    sys.exit("persistent kernels with a stack frame or spills: " + ", ".join(bad))
PY
done
echo "CUDA compile check passed: ${#sources[@]} file(s)"
