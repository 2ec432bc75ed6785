"""nvit_kernels: the fused kernels behind nvit (Triton, CUDA, C++ CPU) as torch custom ops."""
from .dispatch import set_cuda_backend, use_backend  # noqa: F401
