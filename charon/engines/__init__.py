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


def create_engine(name: str, detector, config: EngineConfig | None = None, chroma_detector=None) -> Engine:
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
        from ..geometry.chroma_import import ChromaUnavailable, import_chroma

        try:
            import_chroma()
        except ChromaUnavailable as exc:
            raise EngineError(f"--engine chroma: {exc}") from None
        if chroma_detector is None:
            raise EngineError("--engine chroma needs a Chroma detector: --detector FILE.pkl or module:function")
        from .chroma import ChromaEngine

        return ChromaEngine(detector, config, chroma_detector)
    raise EngineError(f"unknown engine {name!r}; choose one of {ENGINES}")


__all__ = ["Engine", "EngineConfig", "EngineError", "create_engine", "cuda_usable"]
