"""Native kernels behind ``akl_core.divergences.compute`` and ``akl_core.fused.compute_fused``.

``dispatch`` decides when they run (CUDA tensors, Triton importable, a supported divergence) and
holds their autograd wrappers; ``akl_triton`` is the Triton kernel. The pure-PyTorch path stays
the reference and the fallback; nothing here is needed on CPU.
"""
