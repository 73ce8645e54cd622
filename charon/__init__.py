"""charon: a batch-oriented multi-event GPU scheduler for optical-photon simulation."""

__version__ = "0.1.0"
