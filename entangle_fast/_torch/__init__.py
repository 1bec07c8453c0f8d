"""The PyTorch backend of every op, one module per op named like its Triton launcher in ``kernels/``.

``logprob`` (the fused log-prob forward/backward), ``ghost_gram`` (the ghost Gram), ``pair_wgrad`` (the pair weight
gradient). Each implements its op's launcher contract in bounded tiles, for CPU, float64 and features the kernels
lack; the public modules register them in :mod:`entangle_fast._backend`.
"""
