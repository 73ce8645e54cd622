"""The charon detector file: a ``.npz`` read with ``allow_pickle=False``.

The keys and their meaning are listed in ``docs/detector-format.md`` and in
:data:`charon.geometry.detector.ALL_KEYS`; loading validates everything.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .detector import Detector, DetectorError


def save_detector(det: Detector, path: str | os.PathLike) -> None:
    """Write ``det`` as a compressed ``.npz``. Strings are stored as unicode arrays."""
    det.validate()
    np.savez_compressed(path, **det.arrays())


def load_detector(path: str | os.PathLike) -> Detector:
    """Read and validate a detector file. Raises :class:`DetectorError`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DetectorError("<file>", f"cannot read {os.fspath(path)!r} as .npz: {exc}") from exc
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise DetectorError("<file>", f"cannot read {os.fspath(path)!r} as .npz without pickle: {exc}") from exc
    return Detector.from_arrays(arrays)
