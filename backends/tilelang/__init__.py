"""``tilelang``: the ReBased spec lowered to TileLang (issue 4; first step, not registered yet).

``kernels.forward_kernel`` returns the forward as a ``T.prim_func`` (pre-transform, chunk
walk with the state on chip, fp32 normaliser; one program per (batch, head)); ``call.forward``
compiles it (CUDA on a GPU, TileLang's C target on the CPU) and maps its state to the spec's
layout. It is not registered as a backend until it has run on a GPU: the tests lower it to
Hopper CUDA and check its numerics through the C target (``tests/test_tilelang.py``).
Nothing here imports TileLang until a kernel is built.
"""
