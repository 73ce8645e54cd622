"""Request queue policies: which queued event goes into the next batch.

Policy is kept apart from mechanism (the batcher only calls ``peek``/``pop``),
as in vLLM's v1 scheduler, so that a fair-share or priority policy can replace
FCFS without touching batching, splitting or demultiplexing.
"""

from __future__ import annotations

import abc
import collections

from .request import EventRequest


class RequestQueue(abc.ABC):
    @abc.abstractmethod
    def push(self, req: EventRequest) -> None: ...

    @abc.abstractmethod
    def peek(self) -> EventRequest | None:
        """The next request to batch (may be partly dispatched already)."""

    @abc.abstractmethod
    def pop(self) -> EventRequest: ...

    @abc.abstractmethod
    def oldest_arrival(self) -> float | None:
        """Arrival time of the longest-waiting request, for --max-wait-ms."""

    @abc.abstractmethod
    def __len__(self) -> int: ...


class FCFSQueue(RequestQueue):
    """First come, first served across all clients."""

    def __init__(self):
        self._q: collections.deque[EventRequest] = collections.deque()

    def push(self, req):
        self._q.append(req)

    def peek(self):
        return self._q[0] if self._q else None

    def pop(self):
        return self._q.popleft()

    def oldest_arrival(self):
        return self._q[0].arrival if self._q else None

    def __len__(self):
        return len(self._q)


POLICIES = {"fcfs": FCFSQueue}


def make_queue(policy: str) -> RequestQueue:
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown queue policy {policy!r}; choose one of {sorted(POLICIES)}") from None
