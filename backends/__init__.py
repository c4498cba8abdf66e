"""Built-in backends: importing this package registers each one (a folder per backend)."""

from . import numba, reference, torch, torch_compile, triton  # noqa: F401
