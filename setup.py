"""minseg: segmentation learned by generating images.

Plain `pip install -e .` builds nothing: the ops extension is compiled lazily on first use (ninja JIT).
`MINSEG_BUILD_EXT=1 pip install --no-build-isolation .` builds it ahead of time against the torch already
installed (never list torch as a build requirement: an isolated build would fetch a multi-GB CUDA torch).
"""

import glob
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithKernelSources(build_py):
    """Ship csrc/ inside the wheel as minseg/_csrc so an installed minseg can still JIT-build its ops."""

    def run(self):
        super().run()
        shutil.copytree("csrc", Path(self.build_lib) / "minseg" / "_csrc", dirs_exist_ok=True)


def extension_modules():
    if os.environ.get("MINSEG_BUILD_EXT") != "1":
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch
    sources = sorted(glob.glob("csrc/*.cpp"))
    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if use_cuda:
        sources += sorted(glob.glob("csrc/*.cu"))
        ext = CUDAExtension("minseg._C", sources, include_dirs=[os.path.abspath("csrc")],
                            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-DWITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("minseg._C", sources, include_dirs=[os.path.abspath("csrc")],
                           extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, ext_cmdclass = extension_modules()
setup(
    name="minseg",
    version="0.1.0",
    description="Segmentation learned by generating images: layered GAN, independence prior, GANSeg, GAN annotation",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minseg", "minseg.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "pillow", "tqdm", "ninja"],
    extras_require={"test": ["pytest", "hypothesis"], "plot": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithKernelSources, **ext_cmdclass},
    entry_points={"console_scripts": ["minseg=minseg.cli:main"]},
)
