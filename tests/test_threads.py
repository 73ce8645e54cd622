import sys
import threading

import pytest

from charon.threads import set_native_thread_name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl names are Linux-only")
def test_native_thread_name_is_visible_in_proc():
    seen = {}

    def body():
        seen["ok"] = set_native_thread_name("charon-test-thread-long-name")
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["comm"] = f.read().strip()

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen["ok"] is True
    assert seen["comm"] == "charon-test-thr"  # the kernel keeps 15 bytes
