"""Triton device code of probact_gpu (``@triton.jit`` functions only), installed as
``probact_gpu.kernels``. Host code, launch heuristics and the PyTorch API live in
``probact_gpu``."""
