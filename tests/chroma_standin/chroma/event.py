import numpy as np


class Photons:
    def __init__(self, pos=np.empty((0, 3)), dir=np.empty((0, 3)), pol=np.empty((0, 3)), wavelengths=np.empty(0),
                 t=None, last_hit_triangles=None, flags=None, weights=None, evidx=None, channel=None):
        self.pos = np.asarray(pos, np.float32)
        self.dir = np.asarray(dir, np.float32)
        self.pol = np.asarray(pol, np.float32)
        self.wavelengths = np.asarray(wavelengths, np.float32)
        n = len(self.pos)
        self.t = np.zeros(n, np.float32) if t is None else np.asarray(t, np.float32)
        self.last_hit_triangles = np.full(n, -1, np.int32) if last_hit_triangles is None else np.asarray(last_hit_triangles, np.int32)
        self.flags = np.zeros(n, np.uint32) if flags is None else np.asarray(flags, np.uint32)
        self.weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
        self.evidx = np.zeros(n, np.uint32) if evidx is None else np.asarray(evidx, np.uint32)
        self.channel = np.full(n, -1, np.int32) if channel is None else np.asarray(channel, np.int32)

    def __len__(self):
        return len(self.pos)
