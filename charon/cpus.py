"""CPU lists and affinity (Linux): which cores a process or a thread may run on."""

from __future__ import annotations

import os


def parse_cpus(spec: str | None) -> set[int] | None:
    """A Linux CPU list ("0-7,16,18-19") -> set of CPU numbers; None for None or ""."""
    if not spec:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError(f"CPU list {spec!r}: pinning to CPUs needs Linux (os.sched_setaffinity)")
    cpus: set[int] = set()
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"bad CPU list {spec!r}: {part!r} is not N or N-M") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bad CPU list {spec!r}: {part!r} is not an increasing range")
        cpus.update(range(lo, hi + 1))
    missing = cpus - os.sched_getaffinity(0)
    if missing:
        raise ValueError(f"CPU list {spec!r} names CPUs this process may not use: {sorted(missing)[:8]}")
    return cpus


def pin(cpus: set[int] | None) -> None:
    """Restrict the calling thread (and the threads and processes it starts later) to ``cpus``; no-op for None.

    On Linux the affinity belongs to a thread: pinning one thread of a process leaves the others where they are."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def pin_all_threads(cpus: set[int]) -> None:
    """Restrict every thread this process has now (e.g. BLAS pools started at import) to ``cpus``;
    threads started later inherit their starter's CPUs."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # ended meanwhile
            pass


def split_engine_cpus(spec: str | None, keep_off: str | None = None) -> tuple[set[int], set[int]] | None:
    """``--engine-cpus``: (the shared engine thread's CPUs, the CPUs left for everything else), or None.
    ``keep_off``: further CPUs left out of the rest (under --gpus-share port, the other GPUs' engine threads').

    ValueError when the list is malformed, names CPUs this process may not use, or leaves none over."""
    engine = parse_cpus(spec)
    if engine is None:
        return None
    rest = os.sched_getaffinity(0) - engine - (parse_cpus(keep_off) or set())
    if not rest:
        raise ValueError(f"--engine-cpus {spec!r} leaves no CPU for the front ends")
    return engine, rest


def engine_cpus_per_gpu(spec: str, n_gpus: int) -> list[str]:
    """``--gpus ... --gpus-share port --engine-cpus LIST``: LIST in ascending order, cut into one equal share
    per GPU (a CPU list each), for that GPU's shared engine thread."""
    cpus = sorted(parse_cpus(spec) or ())
    if not cpus or len(cpus) % n_gpus:
        raise ValueError(f"--engine-cpus {spec!r} with {n_gpus} GPUs: list the same number of CPUs for each GPU's "
                         f"engine thread ({len(cpus)} listed)")  # fmt: skip
    k = len(cpus) // n_gpus
    return [",".join(map(str, cpus[i * k:(i + 1) * k])) for i in range(n_gpus)]
