"""Engines: one propagation call per batch (``cpu``, ``cuda``, ``chroma``)."""

from __future__ import annotations

from .base import Engine, EngineConfig, EngineError

ENGINES = ("auto", "cpu", "cuda", "chroma")


def cuda_usable() -> bool:
    """True when numba-cuda is installed and a real GPU answers (the simulator does not count)."""
    try:
        from .cuda import gpu_available
    except Exception:
        return False
    return gpu_available()


def create_engine(name: str, detector, config: EngineConfig | None = None) -> Engine:
    config = config or EngineConfig()
    if name == "auto":
        name = "cuda" if cuda_usable() else "cpu"
    if name == "cpu":
        from .cpu import CPUEngine

        return CPUEngine(detector, config)
    if name == "cuda":
        from .cuda import CUDAEngine

        return CUDAEngine(detector, config)
    if name == "chroma":
        raise EngineError("the chroma engine is not available in this build; use --engine cpu or cuda")
    raise EngineError(f"unknown engine {name!r}; choose one of {ENGINES}")


__all__ = ["Engine", "EngineConfig", "EngineError", "create_engine", "cuda_usable"]
