"""``tilelang``: the ReBased spec lowered to TileLang (issue 4; forward only, not registered yet).

``kernels.forward_kernel`` returns the forward of any ``sim = c0 + c1 s + c2 s^2`` (every
preset: ``rebased`` and its ablations, ``based``) as a ``T.prim_func``: pre-transform, chunk
walk with the whole state on chip (one unscaled block per power present; an absent power
costs nothing), fp32 normaliser or none (``normalize=False``), an optional initial state;
one program per (batch, head), D <= 16, Dv <= 64. ``call.forward`` compiles it (CUDA on a
GPU, TileLang's C target on the CPU) and maps the state between the kernel's layout
(``layout``) and the spec's canonical one, both ways. It is not registered as a backend
until it has run on a GPU: the tests lower it to Hopper CUDA and check its numerics through
the C target (``tests/test_tilelang.py``). Nothing here imports TileLang until a kernel is
built.
"""
