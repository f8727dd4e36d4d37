"""Triton device code of probact_gpu (``@triton.jit`` functions only), installed as
``probact_gpu.kernels``. Host code, launch heuristics and the PyTorch API live in
``probact_gpu``.

This folder sits at the repository root, and Python puts the directory it starts in first on
``sys.path`` (``python``, ``python -m pytest``, a notebook): from the root, ``import kernels``
would find this folder before Hugging Face's package ``kernels``, which transformers imports. So
when this file runs as a top-level ``kernels`` it steps aside: it loads the next ``kernels`` on
the path in its place, or fails exactly as the import would without this folder. As
``probact_gpu.kernels`` (the only way the package imports it) the block below does nothing.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
