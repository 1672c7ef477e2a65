"""Compiled kernels (Cython) and their plain-numpy twins.

Kernels never validate their input: the public Python modules (``recsvc.ranking``,
``recsvc.reranking``, ``recsvc.exploration``) coerce dtypes, check shapes and
allocate outputs, then call a kernel here that runs without the GIL.
The numpy twins in ``recsvc._fastpath.twins`` compute the same results and are
used by the parity tests and as benchmark baselines.
"""
