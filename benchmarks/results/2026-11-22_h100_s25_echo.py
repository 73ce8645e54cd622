"""The transport floor: a ROUTER that answers every PHOTONDATA at once with an empty SIM_COMPLETE (no decode,
no batch, no engine), in the same poll/recv/send calls the server uses. Run charon-bench against it."""
import sys, threading, time, zmq
from charon.sockets import recv_message, send_message
ctx = zmq.Context.instance()
s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.LINGER, 0)
port = s.bind_to_random_port("tcp://127.0.0.1")
print(f"tcp://127.0.0.1:{port}", flush=True)
poller = zmq.Poller(); poller.register(s, zmq.POLLIN)
empty = b""
deadline = time.monotonic() + float(sys.argv[1]) if len(sys.argv) > 1 else 1e18
while time.monotonic() < deadline:
    if not poller.poll(100):
        continue
    while True:
        try:
            m = recv_message(s)
        except zmq.Again:
            break
        i = 0
        while len(m[i]) > 0 and bytes(m[i]) != b"PHOTONDATA":
            i += 1
        env = m[: i + 1] if len(m[i]) == 0 else m[:i]
        body = m[len(env):]
        if bytes(body[0]) == b"PHOTONDATA":
            send_message(s, [*env, b"SIM_COMPLETE", bytes(body[1])[:4], empty, empty, empty])
        else:
            send_message(s, [*env, b"PONG"])
