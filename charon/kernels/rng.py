"""Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11).

Every photon draws from its own stream, a pure function of
``(seed, event_id, photon_index, draw_counter)``: the Philox key is
``(seed, event_id)`` and the counter ``(photon_index, block, 0, 0)``; each
block gives four 32-bit words, handed out one at a time. So an event's hits
are the same whatever else shares its batch, and a rerun reproduces them.

The per-photon stream state lives in a small uint32 array owned by the caller
(a local array on the GPU, a per-photon array on the CPU):

    state[0] seed, state[1] event id, state[2] photon index within the event,
    state[3] next block number, state[4] words used from the buffer (0..4),
    state[5:9] the buffered block.
"""

from __future__ import annotations

import numpy as np

RNG_STATE_SIZE = 9

_MASK = np.uint64(0xFFFFFFFF)
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_S32 = np.uint64(32)
_TWO_M32 = 2.0**-32


def make_rng(jit):
    """Build the device functions for one target; ``jit`` is e.g. ``numba.njit``."""

    @jit
    def philox4x32(k0, k1, c0, c1, c2, c3):
        # All arithmetic in uint64, masked to 32 bits: numba types uint32*uint32 as 64-bit anyway.
        k0 = np.uint64(k0) & _MASK
        k1 = np.uint64(k1) & _MASK
        c0 = np.uint64(c0) & _MASK
        c1 = np.uint64(c1) & _MASK
        c2 = np.uint64(c2) & _MASK
        c3 = np.uint64(c3) & _MASK
        for _ in range(10):
            p0 = _M0 * c0
            p1 = _M1 * c2
            hi0 = p0 >> _S32
            lo0 = p0 & _MASK
            hi1 = p1 >> _S32
            lo1 = p1 & _MASK
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        return c0, c1, c2, c3

    @jit
    def rng_init(state, seed, event_id, photon_index):
        state[0] = seed
        state[1] = event_id
        state[2] = photon_index
        state[3] = 0
        state[4] = 4  # buffer empty: the first draw generates block 0

    @jit
    def uniform(state):
        """Next uniform float64 in (0, 1] (never 0, so -log(u) is finite)."""
        if state[4] >= 4:
            r0, r1, r2, r3 = philox4x32(state[0], state[1], state[2], state[3], 0, 0)
            state[5] = r0
            state[6] = r1
            state[7] = r2
            state[8] = r3
            state[3] += 1
            state[4] = 0
        w = state[5 + state[4]]
        state[4] += 1
        return (float(w) + 1.0) * _TWO_M32

    return philox4x32, rng_init, uniform
