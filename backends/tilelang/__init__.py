"""``tilelang``: the ReBased spec lowered to TileLang (issue 4; not registered yet).

``kernels.forward_kernel`` returns the forward of any ``sim = c0 + c1 s + c2 s^2`` (every
preset: ``rebased`` and its ablations, ``based``) as a ``T.prim_func``: pre-transform, chunk
walk with the whole state on chip (one unscaled block per power present; an absent power
costs nothing), fp32 normaliser or none (``normalize=False``), an optional initial state;
one program per (batch, head), D <= 16, Dv <= 64. ``backward.dq_kernel`` and
``backward.dkv_kernel`` are its backward as two more walks (dq, d gamma_q, d beta_q and the
per-token 1 / (den + eps) and r in order; dk, dv, d gamma_k, d beta_k and the initial
state's gradient in reverse, from the final state's cotangent); the pieces of a walk live
once, in ``tiles``. ``call.forward`` / ``call.backward`` compile them (CUDA on a GPU,
TileLang's C target on the CPU), launch them and map the state and its cotangents between
the kernel's layout (``layout``) and the spec's canonical one; ``hopper`` lowers them for
sm_90a on any machine. It is not registered as a backend until it has run on a GPU: the
tests lower it to Hopper CUDA and check its numerics through the C target
(``tests/test_tilelang.py``). Nothing here imports TileLang until a kernel is built.
"""
