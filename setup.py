"""Builds fused_rnn._C (the op schemas; the CUDA backend when CUDA torch and nvcc are present) and
the CPU backend once per instruction set, fused_rnn._cpu_<set> for set in avx512, avx2, default
(x86-64; elsewhere default only): fused_rnn imports the best one the running CPU has, so one build
runs on any CPU.

Environment switches:
  FUSED_RNN_CUDA=0|1   force the CUDA backend off / on (on fails loudly if it cannot be built)
  FUSED_RNN_SIMD=avx512|avx2|none   build only that CPU backend (none: default), e.g. for a quicker
                       build; the package then runs only on CPUs that have that instruction set
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured as in torch.utils.cpp_extension.
"""
import copy
import os
import platform
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def read_version():
    for line in (ROOT / "fused_rnn" / "_version.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("fused_rnn/_version.py has no __version__")


def switch(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


# Instruction set -> compiler flags of its CPU backend module.
SIMD_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DFUSED_RNN_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DFUSED_RNN_AVX2"],
    "default": [],
}


def cpu_instruction_sets():
    forced = os.environ.get("FUSED_RNN_SIMD")
    if forced:
        forced = "default" if forced == "none" else forced
        if forced not in SIMD_FLAGS:
            raise SystemExit(f"FUSED_RNN_SIMD must be one of avx512, avx2, none, got {forced!r}")
        return [forced]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    return list(SIMD_FLAGS)


def torch_uses_openmp():
    import torch

    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1].splitlines()[0]


def want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = switch("FUSED_RNN_CUDA")
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        reasons.append("no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if forced is True and reasons:
        raise SystemExit("FUSED_RNN_CUDA=1 but the CUDA backend cannot be built: " + "; ".join(reasons))
    if forced is False:
        return False
    return not reasons


def default_cuda_archs():
    """Ampere through Hopper (with PTX for newer GPUs), plus each visible GPU's own
    architecture, clamped as torch does to the newest one this torch was built for."""
    import torch

    archs = ["8.0", "8.6", "8.9", "9.0+PTX"]
    if torch.cuda.is_available():
        built = [int(re.sub(r"\D", "", a)) for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
        newest = max(built, default=90)
        for device in range(torch.cuda.device_count()):
            major, minor = min(torch.cuda.get_device_capability(device), (newest // 10, newest % 10))
            arch = f"{major}.{minor}"
            if all(a.split("+")[0] != arch for a in archs):
                archs.append(arch)
    return " ".join(archs)


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    # at::parallel_for is an OpenMP region in the headers: without -fopenmp it silently runs on
    # one thread. The libgomp it links is the one torch has already loaded (same soname).
    link = []
    if torch_uses_openmp():
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    cpu = [CppExtension(f"fused_rnn._cpu_{name}", ["csrc/cpu/backend.cpp"], extra_link_args=link,
                        extra_compile_args={"cxx": cxx + SIMD_FLAGS[name]}) for name in cpu_instruction_sets()]
    sources = ["csrc/ops.cpp"]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_archs()
        sources += ["csrc/cuda/kernels.cu", "csrc/cuda/persistent.cu", "csrc/cuda/backend.cpp"]
        # No --use_fast_math: it turns tanhf into tanh.approx.f32 (error ~2^-11) and divisions
        # into approximations, which breaks float32 parity with cuDNN; the pointwise kernels
        # are bound by memory traffic, not arithmetic.
        nvcc = ["-O3"]
        return [CUDAExtension("fused_rnn._C", sources, extra_link_args=link,
                              extra_compile_args={"cxx": cxx + ["-DFUSED_RNN_WITH_CUDA"], "nvcc": nvcc}), *cpu]
    return [CppExtension("fused_rnn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link), *cpu]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension.with_options(use_ninja=True)):
        """Each extension gets its own build directory: the CPU backends compile the same source
        with different flags, and would otherwise share one object file and ninja build. It is
        set on a copy of this command, so that `build_ext --parallel N` can build them at once
        (each in a thread of its own)."""

        def build_extension(self, ext):
            own = copy.copy(self)
            own.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[-1])
            super(Build, own).build_extension(ext)

    return Build


setup(
    name="fused_rnn",
    version=read_version(),
    packages=find_packages(include=["fused_rnn", "fused_rnn.*", "benchmarks", "benchmarks.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
