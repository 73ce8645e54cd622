"""Each photon's event slot, from the batch's per-event offsets, on the device.

Why on the device: the CUDA engine needs ``slot[i]`` (the RNG key and the event
of photon ``i``), and a merged batch is gathered from front ends' shared memory
piece by piece. Numbering slots on the host meant an ``np.repeat`` per front-end
batch on the shared engine's thread plus one more host-to-device copy per merged
batch; the offsets are on the device anyway. Numpy reference:
:func:`charon.kernels.reference.photon_slots_ref`.

A global kernel (GPU only); ``cuda`` is a module global so that the CUDA
simulator can stand in for it.
"""

from __future__ import annotations

from ..engines.cuda_compat import ensure_numpy_compat

ensure_numpy_compat()

from numba import cuda  # noqa: E402


@cuda.jit
def photon_slots(offsets, slot, n_events, n):
    """slot[i] = the s with offsets[s] <= i < offsets[s + 1], for i < n (empty slots are skipped).

    offsets [n_events + 1] int64, non-decreasing from 0 to n; slot [>= n] int32."""
    i = cuda.grid(1)
    if i >= n:
        return
    lo, hi = 0, n_events  # invariant: offsets[lo] <= i < offsets[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if offsets[mid] <= i:
            lo = mid
        else:
            hi = mid
    slot[i] = lo
