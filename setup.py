"""Builds protoclr._C (C++/OpenMP CPU ops, plus CUDA ops when a CUDA toolchain is usable).

Environment:
  PROTOCLR_CUDA=auto|0|1   build csrc/cuda/*.cu: auto = when torch is a CUDA build and nvcc is found
  TORCH_CUDA_ARCH_LIST     e.g. "9.0"; default: the visible GPU's arch, else "8.0;9.0"
  CUDA_HOME                toolkit root; found automatically even when the nvcc on PATH is a wrapper
  DEBUG=1                  -O0 -g instead of -O3 -g0
  MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit_root(path):
    nvcc = os.path.join(path, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))):
        return False
    with open(nvcc, "rb") as f:
        return f.read(4) == b"\x7fELF"  # a wrapper script is not the toolkit's nvcc


def find_cuda_home():
    """The CUDA toolkit root, or None. Torch's own guess (dirname of `which nvcc`) is wrong when the
    nvcc on PATH is a wrapper script, so we follow the script's exec target too."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if not head.startswith(b"\x7fELF"):
                for target in re.findall(rb"(/\S+/bin/nvcc)\b", head):
                    candidates.append(os.path.dirname(os.path.dirname(target.decode())))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and _is_toolkit_root(c):
            return c
    return None


def _default_arch_list(torch):
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "8.0;9.0"  # Ampere and Hopper


def get_extensions():
    mode = os.environ.get("PROTOCLR_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"PROTOCLR_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_home = find_cuda_home() if mode != "0" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

    import torch
    from torch.utils import cpp_extension

    use_cuda = False
    if mode != "0":
        why_not = None
        if torch.version.cuda is None:
            why_not = f"torch {torch.__version__} is not a CUDA build"
        elif cuda_home is None:
            why_not = "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
        if why_not and mode == "1":
            sys.exit(f"PROTOCLR_CUDA=1 but the CUDA sources cannot be built: {why_not}.")
        use_cuda = why_not is None
        if why_not:
            print(f"protoclr: building without CUDA: {why_not}", file=sys.stderr)
    if use_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(torch))

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    extra = {"cxx": opt + ["-fopenmp"]}
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    ext_cls = cpp_extension.CppExtension
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvidia_inc = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")
        if os.path.isdir(nvidia_inc):
            include_dirs.append(nvidia_inc)
        extra["cxx"].append("-DPROTOCLR_WITH_CUDA")
        extra["nvcc"] = [f for f in opt if f != "-g0"] + [
            "-DPROTOCLR_WITH_CUDA",
            "--expt-relaxed-constexpr",
            "-lineinfo",
        ]  # nvcc rejects -g0
        ext_cls = cpp_extension.CUDAExtension
    return [
        ext_cls(
            "protoclr._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """Objects live in build/temp: pip's editable install would give build_ext a new temporary folder each time,
        and ninja would rebuild every source (~100 s per .cu) when one changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "temp")

    return {"build_ext": BuildExt}


setup(
    name="protoclr",
    version="0.1.0",
    description="Siamese Prototypical Contrastive Learning with fused Triton/CUDA/C++ kernels",
    packages=find_packages(include=["protoclr", "protoclr.*"]) + ["protoclr.kernels"],
    package_dir={"protoclr.kernels": "kernels"},
    ext_modules=get_extensions(),
    cmdclass=_cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
)
