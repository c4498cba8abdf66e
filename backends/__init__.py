"""Built-in backends: importing this package registers each one (a folder per backend)."""

from . import fla, numba, reference, tilelang, torch, torch_compile, triton  # noqa: F401
