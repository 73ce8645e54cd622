"""The batcher's assembly of a batch, against the numpy reference (PhotonBatch.from_events of the same photons)."""

import numpy as np

from charon.photons import CHERENKOV, N_ROWS, PhotonBatch
from charon.scheduler.batcher import Batcher, HostBuffer, assemble
from charon.scheduler.queue import FCFSQueue
from charon.scheduler.request import EventRequest
from charon.sources import random_event


def _request(event_id, table, flags=None):
    rows = [np.frombuffer(np.ascontiguousarray(table[r]).tobytes(), "<f4") for r in range(N_ROWS)]  # as decoded
    return EventRequest(event_id, table.shape[1], rows, flags, (event_id, table.shape[1]), None, 0.0)


def test_assembled_batch_equals_the_concatenated_events_including_a_split_one():
    rng = np.random.default_rng(3)
    tables = [random_event(n, rng) for n in (300, 50, 900, 0, 120)]
    flags = [None, np.full(50, CHERENKOV, np.uint32), None, None, (np.arange(120) % 3).astype(np.uint32)]
    batcher = Batcher(FCFSQueue(), max_batch_photons=1000)
    for i, (t, f) in enumerate(zip(tables, flags)):
        batcher.add(_request(10 + i, t, f))
    buf = HostBuffer()
    first = batcher.assemble(batcher.take(), buf)  # 300 + 50 + the first 650 of the 900
    p = first.photons
    want = PhotonBatch.from_events([tables[0], tables[1], tables[2][:, :650]], [10, 11, 12],
                                   flags=[np.zeros(300, np.uint32), flags[1], np.zeros(650, np.uint32)],
                                   first_index=[0, 0, 0])  # fmt: skip
    for got, ref in ((p.table, want.table), (p.flags, want.flags), (p.slot, want.slot), (p.offsets, want.offsets),
                     (p.event_id, want.event_id), (p.first_index, want.first_index)):  # fmt: skip
        np.testing.assert_array_equal(got, ref)
    # Table and flags lie in the buffer as one block of rows (what an engine copies in one go).
    assert p.rows.shape == (N_ROWS + 1, 1000) and np.shares_memory(p.rows, buf.words)
    np.testing.assert_array_equal(p.rows[:N_ROWS], want.table)
    np.testing.assert_array_equal(p.rows[N_ROWS].view(np.uint32), want.flags)
    second = assemble(batcher.take(), HostBuffer(), 1000).photons  # the rest of the split event, then two more
    want = PhotonBatch.from_events([tables[2][:, 650:], tables[3], tables[4]], [12, 13, 14],
                                   flags=[np.zeros(250, np.uint32), np.zeros(0, np.uint32), flags[4]],
                                   first_index=[650, 0, 0])  # fmt: skip
    for got, ref in ((second.table, want.table), (second.flags, want.flags), (second.offsets, want.offsets),
                     (second.first_index, want.first_index)):  # fmt: skip
        np.testing.assert_array_equal(got, ref)


def test_one_slot_batches_equal_the_reference_whatever_the_rows_are():
    """A batch of one slot takes its own path (the usual batch below saturation): a whole event whose rows
    are decoded frames or a [11, n] view of a wider table (the compiled intake's arena), and both pieces
    of a split event, in a buffer that earlier held a larger batch with other values."""
    rng = np.random.default_rng(5)
    t = random_event(700, rng)
    fl = (np.arange(700) * 7 % 5).astype(np.uint32)
    arena = np.zeros((N_ROWS + 1, 2000), np.float32)
    arena[:N_ROWS, 600:1300] = t
    buf = HostBuffer()
    big = Batcher(FCFSQueue(), max_batch_photons=10_000)
    big.add(_request(1, random_event(1500, rng), np.full(1500, 0xFFFF, np.uint32)))
    big.assemble(big.take(), buf)
    whole_rows = EventRequest(7, 700, arena[:N_ROWS, 600:1300], fl, (7, 700), None, 0.0)
    cases = [(_request(7, t, None), 1000, [(0, 700, np.zeros(700, np.uint32))]),
             (whole_rows, 1000, [(0, 700, fl)]),
             (_request(7, t, fl), 400, [(0, 400, fl[:400]), (400, 300, fl[400:])])]  # split: two one-slot batches
    for req, cap, pieces in cases:
        batcher = Batcher(FCFSQueue(), max_batch_photons=cap)
        batcher.add(req)
        for start, count, want_flags in pieces:
            slots = batcher.take()
            assert [(s.start, s.count) for s in slots] == [(start, count)]
            p = batcher.assemble(slots, buf).photons
            want = PhotonBatch.from_events([t[:, start : start + count]], [7], flags=[want_flags], first_index=[start])
            for got, ref in ((p.table, want.table), (p.flags, want.flags), (p.slot, want.slot),
                             (p.offsets, want.offsets), (p.event_id, want.event_id),
                             (p.first_index, want.first_index)):  # fmt: skip
                np.testing.assert_array_equal(got, ref)
                assert got.dtype == ref.dtype
            assert p.rows.shape == (N_ROWS + 1, count) and np.shares_memory(p.rows, buf.words)
            np.testing.assert_array_equal(p.rows[N_ROWS].view(np.uint32), want_flags)
        assert batcher.queued_photons == 0 and batcher.take() == []


def test_flags_of_requests_without_any_are_zero_even_after_a_buffer_held_others():
    """A reused buffer: a dialect-A event's flags are written as zeros, not left from the previous batch."""
    rng = np.random.default_rng(4)
    t = random_event(200, rng)
    buf = HostBuffer()
    batcher = Batcher(FCFSQueue(), max_batch_photons=10_000)
    batcher.add(_request(1, t, np.full(200, 0xFFFF, np.uint32)))
    assert np.all(batcher.assemble(batcher.take(), buf).photons.flags == 0xFFFF)
    batcher.add(_request(2, t, None))
    again = batcher.assemble(batcher.take(), buf).photons
    assert np.all(again.flags == 0) and np.array_equal(again.table, t)


def test_no_flags_grows_and_stays_read_only():
    from charon.scheduler import batcher as b

    k = len(b._zeros) + 5
    big = b._no_flags(k)
    assert len(big) == k and len(b._zeros) >= k and not big.any()
    assert not big.flags.writeable and not b._zeros.flags.writeable
