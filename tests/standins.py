"""Engine stand-ins shared by the server, router and run-output tests."""

import threading


class Gate(threading.Event):
    """A GatedEngine's gate that also counts the calls that reached it, so that a test waits for "the engine
    holds the first batch" instead of sleeping and hoping (a sleep was too short on CI's two cores)."""

    def __init__(self):
        super().__init__()
        self._entered = threading.Condition()
        self.entered = 0

    def enter(self):
        with self._entered:
            self.entered += 1
            self._entered.notify_all()

    def wait_entered(self, k: int = 1, timeout: float = 10.0):
        with self._entered:
            assert self._entered.wait_for(lambda: self.entered >= k, timeout), f"{self.entered} calls, expected {k}"


class GatedEngine:
    """Wraps a real engine; each batch waits until the test opens the gate (keeps the engine occupied)."""

    def __init__(self, inner, gate):
        self.inner, self.gate = inner, gate
        self.name, self.last_times, self.calls = "gated", inner.last_times, 0

    def warm_up(self):  # compiled before the server listens, so that no gated call includes compiling
        self.inner.warm_up()

    def propagate(self, batch, keep_photons=False):
        self.calls += 1
        if isinstance(self.gate, Gate):
            self.gate.enter()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.propagate(batch)

    def close(self):
        pass


class LanedEngine:
    """Wraps a real engine with the CUDA engine's asynchronous interface (``lanes``, ``launch``, ``ready``,
    ``finish``): each launch holds a lane until the test opens that launch's gate (``gates[k]``).

    ``fail_at`` ("launch" or "finish"): a batch with a photon of wavelength 666 nm fails there, and
    in ``propagate`` (the bisecting path)."""

    def __init__(self, inner, lanes=2, fail_at=None):
        import threading

        self.inner, self.fail_at = inner, fail_at
        self.name, self.last_times = "laned", inner.last_times
        self.lanes = [object() for _ in range(lanes)]
        self.gates: list[threading.Event] = []  # one per launch, in launch order
        self.launched: list[int] = []  # events of each launch
        self.running = 0
        self.max_running = 0
        self.ready_calls = 0
        self._event = threading.Event

    def warm_up(self):  # compiled before the server listens, so that no gate's wait includes compiling
        self.inner.warm_up()

    def _faulty(self, batch):
        import numpy as np

        return bool(np.any(batch.table[9] == 666.0))

    def launch(self, batch, keep_photons=False):
        assert self.running < len(self.lanes), "more batches launched than lanes"
        if self.fail_at == "launch" and self._faulty(batch):
            raise RuntimeError("simulated launch fault")
        gate = self._event()
        self.gates.append(gate)
        self.launched.append(batch.n_events)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        # The batch's buffer may be reused once it is finished, not before: keep a view, compute at finish.
        return batch, gate

    def ready(self, handle):
        self.ready_calls += 1
        return handle[1].is_set()

    def finish(self, handle, borrow=False):
        batch, gate = handle
        try:
            assert gate.wait(30), "the test never opened the gate"
            if self.fail_at == "finish" and self._faulty(batch):
                raise RuntimeError("simulated device fault")
            return self.inner.propagate(batch)
        finally:
            self.running -= 1

    def propagate(self, batch, keep_photons=False):
        if self.fail_at and self._faulty(batch):
            raise RuntimeError(f"simulated {self.fail_at} fault")
        return self.inner.propagate(batch)

    def close(self):
        pass
