"""Engine stand-ins shared by the server, router and run-output tests."""


class GatedEngine:
    """Wraps a real engine; each batch waits until the test opens the gate (keeps the engine occupied)."""

    def __init__(self, inner, gate):
        self.inner, self.gate = inner, gate
        self.name, self.last_times, self.calls = "gated", inner.last_times, 0

    def warm_up(self):
        pass

    def propagate(self, batch, keep_photons=False):
        self.calls += 1
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.propagate(batch)

    def close(self):
        pass
