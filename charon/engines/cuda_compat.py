"""Compatibility of numba-cuda with the numpy on the GPU machines.

numba-cuda 0.30.4 still refers to ``numpy.row_stack``, which numpy 2.5 removed
(it was a deprecated alias of ``numpy.vstack`` since numpy 2.0). On such a
numpy, compiling any CUDA kernel fails with
``AttributeError: module 'numpy' has no attribute 'row_stack'``.

Rather than pin an old numpy for the GPU extra (CuPy and PyTorch on the same
machines want the new one), charon restores the alias, which is exactly what
it was, before numba-cuda is imported. Nothing is changed when numpy still
has it. Remove this shim when numba-cuda stops using the name.
"""

from __future__ import annotations

import numpy as np


def ensure_numpy_compat() -> bool:
    """Restore ``numpy.row_stack`` as ``numpy.vstack`` if missing. Returns True if it patched."""
    if hasattr(np, "row_stack"):
        return False
    np.row_stack = np.vstack
    return True
