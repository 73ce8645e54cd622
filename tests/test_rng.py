import numba
import numpy as np

from charon.kernels.reference import philox4x32_ref, uniforms_ref
from charon.kernels.rng import RNG_STATE_SIZE

# Known-answer vectors of Philox4x32-10 (Random123 kat_vectors).
KAT = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0xA4093822, 0x299F31D0),
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_reference_matches_known_answers():
    for key, ctr, want in KAT:
        assert tuple(int(x) for x in philox4x32_ref([key], [ctr])[0]) == want


def test_kernel_matches_known_answers(cpu):
    for key, ctr, want in KAT:
        assert tuple(int(x) for x in cpu.philox4x32(*key, *ctr)) == want


def test_kernel_matches_reference_on_random_inputs(cpu, rng):
    keys = rng.integers(0, 2**32, size=(200, 2), dtype=np.uint64)
    ctrs = rng.integers(0, 2**32, size=(200, 4), dtype=np.uint64)
    ref = philox4x32_ref(keys, ctrs)
    got = np.array([cpu.philox4x32(*map(int, k), *map(int, c)) for k, c in zip(keys, ctrs)], dtype=np.uint32)
    np.testing.assert_array_equal(got, ref)


def test_uniform_stream_is_pure_function_of_its_key(cpu):
    uniform, rng_init = cpu.uniform, cpu.rng_init

    @numba.njit
    def draw(seed, event_id, photon_index, n):
        state = np.empty(RNG_STATE_SIZE, np.uint32)
        rng_init(state, seed, event_id, photon_index)
        out = np.empty(n)
        for i in range(n):
            out[i] = uniform(state)
        return out

    a = draw(7, 42, 1000, 11)
    np.testing.assert_array_equal(a, uniforms_ref(7, 42, 1000, 11))
    assert np.all((a > 0) & (a <= 1))
    # Different photon, event or seed: a different stream.
    assert not np.array_equal(a, draw(7, 42, 1001, 11))
    assert not np.array_equal(a, draw(7, 43, 1000, 11))
    assert not np.array_equal(a, draw(8, 42, 1000, 11))
    # Uniformity on many draws: mean 1/2 within 5 standard errors.
    many = draw(1, 2, 3, 200_000)
    assert abs(many.mean() - 0.5) < 5 * np.sqrt(1 / 12 / many.size)
