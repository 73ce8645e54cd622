"""Kernel launches without numba-cuda's per-call dispatch: one ``cuLaunchKernel`` each.

numba's dispatcher types every argument, looks up the overload and marshals each
array into its ABI fields (meminfo, parent, size, itemsize, data, shape...,
strides...) on every launch. The propagation kernel takes 35 arguments (about
200 parameters); measured on the H200 host, that Python work was ~0.35 ms of
every batch, and the shared engine's thread spent most of its time there
(benchmarks/RESULTS.md). Here the parameter block of a compiled kernel is laid
out once, arrays' fields are cached by identity, and a launch only rewrites the
parameters that changed and calls the driver.

Only what charon's kernels use is supported: C-contiguous device arrays,
:class:`DeviceView` (an array described by pointer and shape, so a batch-sized
view of a preallocated buffer costs no numba slicing) and integer scalars.
:meth:`PreboundKernel.check` compares the layout with numba's own marshalling
for real arguments; the CUDA engine uses a prebound kernel only when it agrees,
and keeps numba's dispatcher otherwise (and always in the simulator).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .base import EngineError

_MASK64 = (1 << 64) - 1
_UNSET = object()  # no launch yet: every parameter is written


@dataclass(frozen=True)
class DeviceView:
    """A C-contiguous device array given by its data pointer: ``[shape]`` of ``itemsize``-byte items."""

    ptr: int
    shape: tuple[int, ...]
    itemsize: int
    dtype: np.dtype

    def abi(self) -> list[int]:
        """numba's array ABI fields: meminfo, parent, size, itemsize, data, shape..., strides (bytes)..."""
        strides, s = [], self.itemsize
        for d in reversed(self.shape):
            strides.append(s)
            s *= d
        return [0, 0, s // self.itemsize, self.itemsize, self.ptr, *self.shape, *reversed(strides)]


def stream_handle(stream) -> int:
    """The raw ``CUstream`` of a numba stream (ctypes or cuda.bindings handle) as an int."""
    handle = stream.handle
    return int(handle.value if hasattr(handle, "value") else handle)


def device_ptr(d_array) -> int:
    return d_array.__cuda_array_interface__["data"][0]


def view(d_array, shape: tuple[int, ...]) -> DeviceView:
    """The first prod(shape) items of a contiguous device array, as ``shape``."""
    return DeviceView(device_ptr(d_array), tuple(int(x) for x in shape), d_array.dtype.itemsize, d_array.dtype)


def _as_view(a) -> DeviceView:
    if isinstance(a, DeviceView):
        return a
    cai = a.__cuda_array_interface__
    if cai.get("strides") is not None:
        raise EngineError("internal: prebound launches take C-contiguous device arrays only")
    return DeviceView(cai["data"][0], tuple(cai["shape"]), a.dtype.itemsize, a.dtype)


class PreboundKernel:
    """One compiled numba-cuda kernel, launched through the driver with a reusable parameter block.

    Every parameter gets an 8-byte slot (numba's array fields are pointer-sized;
    integer scalars are written little-endian into the low bytes, which is what
    the driver copies for a 4-byte parameter). Array fields are cached by the
    array object's identity, so callers must pass the same long-lived device
    arrays (or DeviceViews) and rebuild after reallocating them."""

    def __init__(self, dispatcher, example_args: tuple, stream):
        from cuda.bindings import driver

        overloads = list(dispatcher.overloads.values())
        if len(overloads) != 1:
            raise EngineError(f"internal: kernel has {len(overloads)} compiled signatures, expected 1")
        self.kernel = overloads[0]
        self._types = list(self.kernel.argument_types)
        if len(self._types) != len(example_args):
            raise EngineError("internal: argument count differs from the compiled kernel's")
        self._is_array = [hasattr(t, "ndim") and hasattr(t, "layout") for t in self._types]
        # Where each argument's parameters start in the block: a launch rewrites only the arguments
        # that are not the previous launch's very same objects (usually the batch-sized table view
        # and the sizes; the ~30 long-lived buffers are left as they are).
        self._offset, n_params = [], 0
        for t, arr in zip(self._types, self._is_array):
            self._offset.append(n_params)
            n_params += 5 + 2 * t.ndim if arr else 1
        self._last: list = [_UNSET] * len(self._types)  # the previous launch's arguments
        self._slots = np.zeros(n_params, np.uint64)  # the parameter block; its address never changes
        base = self._slots.ctypes.data
        self._ptrs = (ctypes.c_void_p * n_params)(*[base + 8 * i for i in range(n_params)])
        self._ptrs_addr = ctypes.addressof(self._ptrs)
        self._cache: dict[int, tuple[object, list[int]]] = {}
        self._func = int(self.kernel._codelibrary.get_cufunc().handle)
        self._stream = stream_handle(stream)
        self._launch = driver.cuLaunchKernel
        self._ok = driver.CUresult.CUDA_SUCCESS

    def _fields(self, a) -> list[int]:
        if isinstance(a, DeviceView):
            return a.abi()
        hit = self._cache.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        f = _as_view(a).abi()
        self._cache[id(a)] = (a, f)  # holds a reference: the id stays unique while cached
        return f

    def params(self, args) -> list[int]:
        out: list[int] = []
        for a, arr in zip(args, self._is_array):
            if arr:
                out.extend(self._fields(a))
            else:
                out.append(int(a) & _MASK64)  # two's complement: a negative int32's low bytes are right
        return out

    def check(self, args, numba_args=None) -> None:
        """Raise EngineError unless our parameters for ``args`` equal numba's own marshalling of
        ``numba_args`` (the same call with numba arrays where ``args`` has DeviceViews)."""
        for t, arr in zip(self._types, self._is_array):
            if not arr and not str(t).startswith(("int", "uint")):
                raise EngineError(f"internal: prebound launches take integer scalars only, not {t}")
        marshalled: list = []
        retr: list = []
        for t, v in zip(self._types, args if numba_args is None else numba_args):
            self.kernel._prepare_args(t, v, 0, retr, marshalled)
        theirs = [int(getattr(x, "value", x)) & _MASK64 for x in marshalled]
        mine = self.params(args)
        if mine != theirs:
            raise EngineError(f"internal: prebound parameters differ from numba's ({len(mine)} vs {len(theirs)})")

    def __call__(self, grid: int, block: int, *args) -> None:
        if len(args) != len(self._last):
            raise EngineError(f"internal: {len(args)} arguments for a kernel of {len(self._last)}")
        last, slots, offset, is_array = self._last, self._slots, self._offset, self._is_array
        for i, a in enumerate(args):
            if a is last[i]:
                continue
            o = offset[i]
            if is_array[i]:
                f = self._fields(a)
                slots[o : o + len(f)] = f
            else:
                slots[o] = int(a) & _MASK64  # two's complement: a negative int32's low bytes are right
            last[i] = a
        (err,) = self._launch(self._func, grid, 1, 1, block, 1, 1, 0, self._stream, self._ptrs_addr, 0)
        if err != self._ok:
            raise EngineError(f"cuLaunchKernel failed: {err}")
