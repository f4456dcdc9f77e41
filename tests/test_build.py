"""The extension's build and fallback (minseg/ops/_build.py): the CUDA sources compile with nvcc, the C++ path
is live when the build works, MINSEG_EXT_DISABLE=1 falls back to the reference ops, and a failed build warns
once and falls back, or raises under MINSEG_EXT_REQUIRED=1."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import minseg.ops
from minseg.ops import _build
from minseg.ops.composite import composite, composite_reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
# what torch.utils.cpp_extension passes to nvcc, among others: the kernels must build with these too
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def small_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 1, 3, 6, 6, generator=g), torch.rand(2, 1, 1, 6, 6, generator=g),
            torch.randn(2, 3, 6, 6, generator=g), torch.eye(2, 3).expand(2, 1, 2, 3) + 0.05)


def test_cuda_sources_exist():
    assert {p.name for p in CUDA_SOURCES} >= {"composite_cuda.cu"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    command = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", *TORCH_NVCC_FLAGS, f"-I{source.parent}", "-c", str(source),
               "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"


def test_backend_is_cpp_when_the_build_works():
    if not _build.load_extension():  # raises instead under MINSEG_EXT_REQUIRED=1
        pytest.skip(f"the C++ extension is not available: {_build.extension_status()['error']}")
    assert minseg.ops.backend() == "cpp"
    assert minseg.ops.backend("cpu") == "cpp"


def test_disable_variable_selects_the_reference_and_ops_still_work():
    script = (
        "import torch, minseg.ops as ops\n"
        "assert ops.backend() == 'reference', ops.backend()\n"
        "layers, alphas, background = torch.randn(2, 1, 3, 5, 5), torch.rand(2, 1, 1, 5, 5), torch.randn(2, 3, 5, 5)\n"
        "image, warped = ops.composite(layers, alphas, background, ops.perturbation(2, 5))\n"
        "assert image.shape == (2, 3, 5, 5) and warped.shape == (2, 1, 1, 5, 5)\n"
        "heat, embedding = ops.part_heatmaps(torch.rand(2, 4, 2), torch.full((2, 4), 0.2), torch.randn(2, 4, 8), (5, 5))\n"
        "assert heat.shape == (2, 4, 5, 5) and embedding.shape == (2, 8, 5, 5)\n"
        "print(ops.extension_status()['error'])\n"
    )
    env = {**os.environ, _build.ENV_DISABLE: "1", _build.ENV_REQUIRED: "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "disabled by MINSEG_EXT_DISABLE" in result.stdout
    assert "building" not in result.stdout  # nothing is compiled when disabled


@pytest.fixture
def failing_build(monkeypatch):
    """A fresh build state whose build step fails (the library loaded by other tests stays loaded, unused)."""
    def broken_build(use_cuda):
        raise OSError("compiler exploded")

    monkeypatch.setattr(_build, "_state", {"tried": False, "loaded": False, "cuda": False, "error": None})
    monkeypatch.setattr(_build, "_prebuilt_library", lambda: None)
    monkeypatch.setattr(_build, "_jit_build", broken_build)
    monkeypatch.delenv(_build.ENV_DISABLE, raising=False)


def test_failed_build_warns_once_and_falls_back(failing_build, monkeypatch):
    monkeypatch.delenv(_build.ENV_REQUIRED, raising=False)
    inputs = small_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, warped = composite(*inputs)
        composite(*inputs)
        assert minseg.ops.backend() == "reference"
    messages = [str(w.message) for w in caught if "could not be built" in str(w.message)]
    assert len(messages) == 1 and "compiler exploded" in messages[0]
    want_image, want_warped = composite_reference(*inputs)
    assert torch.equal(image, want_image) and torch.equal(warped, want_warped)
    with pytest.raises(RuntimeError, match="impl='ext'"):
        composite(*inputs, impl="ext")


def test_failed_build_raises_when_required(failing_build, monkeypatch):
    monkeypatch.setenv(_build.ENV_REQUIRED, "1")
    with pytest.raises(RuntimeError, match="MINSEG_EXT_REQUIRED=1") as error:
        composite(*small_inputs())
    assert "compiler exploded" in str(error.value)
