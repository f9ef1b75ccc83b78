"""flashlin: fast, exact causal linear attention (gated linear recurrences) for PyTorch.

The ops live in flashlin.ops under fla's names. The compute is libflashlin (C++/CUDA), loaded
with ctypes; tensors are passed as DLPack views, so any torch from 1.13 on works.
"""
from . import modules, ops
from ._lib import FlashlinError, UnsupportedError, lib as _library

__version__ = _library.flashlin_version().decode()


def library_path():
    """The libflashlin.so in use."""
    return _library.path


def cpu_isa():
    """Instruction set of the CPU kernels in use ("avx512", "avx2" or "generic")."""
    return _library.flashlin_cpu_isa().decode()


def has_cuda():
    """Whether the loaded library has its CUDA backend."""
    return bool(_library.flashlin_has_cuda())


def set_num_threads(num_threads):
    """Threads of the CPU backend (0: the default, all cores)."""
    _library.flashlin_set_num_threads(int(num_threads))


__all__ = ["ops", "modules", "FlashlinError", "UnsupportedError", "library_path", "cpu_isa", "has_cuda",
           "set_num_threads", "__version__"]
