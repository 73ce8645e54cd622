"""Direct CUDA driver calls on the shared engine's hot path: copies, timing events, stream waits.

Why not numba-cuda's own objects: every one of its driver calls goes through a
Python wrapper that logs at debug level and converts the result, and
``Event.query`` on a batch still running raises, logs an *error* record and
catches it (``CUDA_ERROR_NOT_READY``). The shared engine's single thread made
about 20 such calls per merged batch and polls running batches between
messages, so at ~1 000 merged batches per second that wrapping was a measurable
share of the thread (cProfile on the H100 host, benchmarks/RESULTS.md). Here each
is one call into ``cuda.bindings`` (numba-cuda's own binding) with the status
checked. The simulator has no driver: the CUDA engine keeps numba's objects there.
"""

from __future__ import annotations

import weakref

import numpy as np

from .base import EngineError
from .cuda_launch import device_ptr, stream_handle


class TimingEvent:
    """A CUDA event with timing, with the part of numba's ``Event`` interface the engine uses.

    ``record`` takes the raw stream handle (:func:`stream_handle`); ``query`` answers
    False while the work before the record is still running, without raising."""

    __slots__ = ("_d", "_ok", "_not_ready", "handle", "__weakref__")

    def __init__(self):
        from cuda.bindings import driver

        self._d = driver
        self._ok = driver.CUresult.CUDA_SUCCESS
        self._not_ready = driver.CUresult.CUDA_ERROR_NOT_READY
        err, self.handle = driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DEFAULT)
        if err != self._ok:
            raise EngineError(f"cuEventCreate failed: {err}")
        weakref.finalize(self, driver.cuEventDestroy, self.handle)

    def record(self, stream: int) -> None:
        (err,) = self._d.cuEventRecord(self.handle, stream)
        if err != self._ok:
            raise EngineError(f"cuEventRecord failed: {err}")

    def query(self) -> bool:
        (err,) = self._d.cuEventQuery(self.handle)
        if err == self._ok:
            return True
        if err == self._not_ready:
            return False
        raise EngineError(f"cuEventQuery failed: {err}")

    def synchronize(self) -> None:
        (err,) = self._d.cuEventSynchronize(self.handle)
        if err != self._ok:
            raise EngineError(f"cuEventSynchronize failed: {err}")

    def elapsed_time(self, end: "TimingEvent") -> float:
        """Milliseconds from this event to ``end`` (both recorded and complete)."""
        err, ms = self._d.cuEventElapsedTime(self.handle, end.handle)
        if err != self._ok:
            raise EngineError(f"cuEventElapsedTime failed: {err}")
        return ms


class DirectCopy:
    """Copies between host and device on one stream, and the wait for them, as one driver call each
    (cuda.bindings, numba-cuda's own binding).

    Measured on the H200 host (benchmarks/launch_overhead.py): numba's
    ``DeviceNDArray`` slicing plus ``copy_to_device`` cost ~80 us of Python per
    copy, so the 16 copies of a batch took ~1.4 ms whatever its size."""

    def __init__(self, stream):
        from cuda.bindings import driver

        self._driver = driver
        self._memcpy = driver.cuMemcpyHtoDAsync
        self._memcpy_d2h = driver.cuMemcpyDtoHAsync
        self._ok = driver.CUresult.CUDA_SUCCESS
        self.two_d = True  # cuMemcpy2DAsync for a piece's rows; CUDAEngine turns it off if its self-check fails
        self._p2d = None  # one CUDA_MEMCPY2D, its fields rewritten per copy (the call reads it at once)
        self._stream = stream_handle(stream)
        self._ptrs: dict[int, tuple[object, int]] = {}  # id(device array) -> (array, data pointer)

    def _ptr(self, d_array) -> int:
        """A device array's data pointer, cached by identity (numba builds a whole
        ``__cuda_array_interface__`` dict to answer it, on every copy)."""
        hit = self._ptrs.get(id(d_array))
        if hit is not None and hit[0] is d_array:
            return hit[1]
        p = device_ptr(d_array)
        self._ptrs[id(d_array)] = (d_array, p)
        return p

    def forget(self) -> None:
        """Drop the cached pointers (and the references that keep their arrays alive): call when
        the device buffers are reallocated."""
        self._ptrs.clear()

    def __call__(self, d_array, host: np.ndarray, dst_index: int = 0) -> None:
        """Copy the C-contiguous ``host`` into ``d_array`` from element ``dst_index`` on."""
        if host.nbytes == 0:
            return
        if not host.flags.c_contiguous:
            raise EngineError("internal: host-to-device copy needs a contiguous host array")
        dst = self._ptr(d_array) + dst_index * d_array.dtype.itemsize
        (err,) = self._memcpy(dst, host.ctypes.data, host.nbytes, self._stream)
        if err != self._ok:
            raise EngineError(f"cuMemcpyHtoDAsync failed: {err}")

    def rows(self, d_array, pitch: int, col: int, host: np.ndarray) -> None:
        """Copy ``host`` [R, k] (rows of any stride, columns contiguous) into columns ``col:col + k`` of
        the rows of ``d_array`` viewed as [R, pitch]: one 2D copy, so a piece costs one driver call."""
        R, k = host.shape
        if k == 0:
            return
        item = host.itemsize
        if host.strides[1] != item:
            raise EngineError("internal: a piece's columns must be contiguous")
        dst = self._ptr(d_array) + col * item
        if self.two_d:
            d = self._driver
            p = self._p2d
            if p is None:
                p = self._p2d = d.CUDA_MEMCPY2D()
                p.srcMemoryType = d.CUmemorytype.CU_MEMORYTYPE_HOST
                p.dstMemoryType = d.CUmemorytype.CU_MEMORYTYPE_DEVICE
            p.srcHost = host.ctypes.data
            p.srcPitch = host.strides[0] if R > 1 else k * item
            p.dstDevice = dst
            p.dstPitch = pitch * item
            p.WidthInBytes = k * item
            p.Height = R
            (err,) = d.cuMemcpy2DAsync(p, self._stream)
            if err != self._ok:
                raise EngineError(f"cuMemcpy2DAsync failed: {err}")
            return
        for r in range(R):
            (err,) = self._memcpy(dst + r * pitch * item, host[r].ctypes.data, k * item, self._stream)
            if err != self._ok:
                raise EngineError(f"cuMemcpyHtoDAsync failed: {err}")

    def to_host(self, host: np.ndarray, d_array, src_index: int = 0) -> None:
        """Copy ``host.size`` items of ``d_array`` from element ``src_index`` on into the contiguous ``host``."""
        if host.nbytes == 0:
            return
        src = self._ptr(d_array) + src_index * d_array.dtype.itemsize
        (err,) = self._memcpy_d2h(host.ctypes.data, src, host.nbytes, self._stream)
        if err != self._ok:
            raise EngineError(f"cuMemcpyDtoHAsync failed: {err}")

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        (err,) = self._driver.cuStreamSynchronize(self._stream)
        if err != self._ok:
            raise EngineError(f"cuStreamSynchronize failed: {err}")
