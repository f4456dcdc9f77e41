"""Lazy build and loading of the C++/CUDA extension behind `minseg.ops` (the StyleGAN2-ADA pattern).

Nothing is compiled at import. The first op call that wants the extension calls `load_extension()`, which
1. loads a library built ahead of time by `setup.py` (MINSEG_BUILD_EXT=1), if present; else
2. JIT-builds `csrc/*.cpp` (plus `csrc/*.cu` when torch has CUDA and a GPU) with ninja into a cache folder
   keyed by a hash of the sources and the torch version, then loads it with `torch.ops.load_library`.
If that fails, every op falls back to its pure-PyTorch reference with one printed warning; with
MINSEG_EXT_REQUIRED=1 (set in CI) the failure is an error instead, so a broken build cannot hide.
MINSEG_EXT_DISABLE=1 skips the extension altogether (reference path only).
"""

import glob
import hashlib
import os
import threading
import time
import warnings
from pathlib import Path

import torch

ENV_REQUIRED = "MINSEG_EXT_REQUIRED"
ENV_DISABLE = "MINSEG_EXT_DISABLE"
LIBRARY_NAME = "minseg_ops"
STALE_LOCK_SECONDS = 600

_lock = threading.Lock()
_state = {"tried": False, "loaded": False, "cuda": False, "error": None}


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def source_dir():
    """The folder holding the kernel sources: `csrc/` in a checkout, `minseg/_csrc/` in an installed wheel."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "_csrc"):
        if (candidate / "composite.cpp").exists():
            return candidate
    raise FileNotFoundError(f"minseg: kernel sources not found next to {here.parents[1]} (csrc/ or minseg/_csrc/)")


def _want_cuda():
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _prebuilt_library():
    hits = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "_C*.so")))
    return hits[0] if hits else None


def _build_directory(sources):
    digest = hashlib.sha1(torch.__version__.encode())
    headers = glob.glob(str(Path(sources[0]).parent / "*.h"))  # the kernels' shared per-pixel math lives there
    for path in sorted(sources) + sorted(headers):
        digest.update(Path(path).read_bytes())
    root = Path(os.environ.get("MINSEG_CACHE", Path.home() / ".cache" / "minseg"))
    folder = root / f"ext-{digest.hexdigest()[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"  # left behind by an interrupted build; torch would wait on it forever
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    return folder


def _jit_build(use_cuda):
    from torch.utils.cpp_extension import load
    src = source_dir()
    sources = sorted(glob.glob(str(src / "*.cpp")))
    if use_cuda:
        sources += sorted(glob.glob(str(src / "*.cu")))
    # -fopenmp: at::parallel_for runs its OpenMP loop inline, so without it the CPU kernels run on one thread.
    # The extension then needs libgomp.so.1, which resolves to the copy torch itself loaded (same soname).
    flags = ["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if use_cuda else [])
    os.environ.setdefault("MAX_JOBS", "2")  # parallel nvcc jobs can run out of memory
    folder = _build_directory(sources)
    if not (folder / f"{LIBRARY_NAME}.so").exists():  # else ninja finds nothing to do: say nothing
        print(f"minseg: building the {'CUDA' if use_cuda else 'C++'} ops extension (first use only, ~30 s)...",
              flush=True)
    load(name=LIBRARY_NAME, sources=sources, extra_cflags=flags, extra_cuda_cflags=["-O3", "--use_fast_math"] if use_cuda else None,
         extra_ldflags=["-fopenmp"], extra_include_paths=[str(src)], build_directory=str(folder),
         is_python_module=False, verbose=False)


def load_extension():
    """Build/load the extension once per process; True when its ops are registered under torch.ops.minseg."""
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        if _flag(ENV_DISABLE):
            _state["error"] = f"disabled by {ENV_DISABLE}=1"
            return False
        try:
            prebuilt = _prebuilt_library()
            if prebuilt is not None:
                torch.ops.load_library(prebuilt)
                _state["cuda"] = hasattr(torch.ops.minseg, "composite") and _want_cuda()
            else:
                use_cuda = _want_cuda()
                _jit_build(use_cuda)
                _state["cuda"] = use_cuda
            _state["loaded"] = True
        except Exception as error:  # any build or load failure: report once, fall back
            _state["error"] = f"{type(error).__name__}: {error}"
            if _flag(ENV_REQUIRED):
                raise RuntimeError(f"minseg: the ops extension failed to build and {ENV_REQUIRED}=1 forbids "
                                   f"falling back to the reference ops:\n{_state['error']}") from error
            warnings.warn(f"minseg: the C++/CUDA ops extension could not be built ({_state['error'].splitlines()[0]}); "
                          "using the pure-PyTorch reference ops instead (slower, same results).", stacklevel=3)
        return _state["loaded"]


def extension_status():
    """A dict: tried, loaded, cuda (kernels for GPU tensors compiled in), error (why not loaded)."""
    return dict(_state)
