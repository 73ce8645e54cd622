import numpy as np

standard_wavelengths = np.arange(60, 1000, 5).astype(np.float32)


class Mesh:
    def __init__(self, vertices, triangles):
        self.vertices = np.asarray(vertices, np.float32)
        self.triangles = np.asarray(triangles, np.int32)


class _Props:
    def set(self, name, value, wavelengths=standard_wavelengths):
        if np.iterable(value):
            if len(value) != len(wavelengths):
                raise ValueError("shape mismatch")
            arr = np.array(list(zip(wavelengths, value)), dtype=np.float32)
        else:
            arr = np.array(list(zip(wavelengths, np.repeat(value, len(wavelengths)))), dtype=np.float32)
        setattr(self, name, arr)


class Material(_Props):
    def __init__(self, name="none"):
        self.name = name
        self.refractive_index = None
        self.absorption_length = None
        self.scattering_length = None
        self.reemission_prob = None
        self.reemission_cdf = None
        self.comp_reemission_prob = []
        self.comp_reemission_wvl_cdf = []
        self.comp_reemission_times = []
        self.comp_reemission_time_cdf = []
        self.comp_absorption_length = []
        self.density = 0.0
        self.composition = {}


class Surface(_Props):
    def __init__(self, name="none", model=0):
        self.name = name
        self.model = model
        for p in ("detect", "absorb", "reemit", "reflect_diffuse", "reflect_specular", "eta", "k", "reemission_cdf"):
            self.set(p, 0)
        self.thickness = 0.0
        self.transmissive = 0


class Solid:
    def __init__(self, mesh, material1=None, material2=None, surface=None, color=0):
        self.mesh = mesh
        n = len(mesh.triangles)
        self.material1 = np.array([material1] * n, dtype=object)
        self.material2 = np.array([material2] * n, dtype=object)
        self.surface = np.array([surface] * n, dtype=object)


class Geometry:
    def __init__(self, detector_material=None):
        self.solids = []
        self.solid_rotations = []
        self.solid_displacements = []
        self.mesh = None

    def add_solid(self, solid, rotation=None, displacement=None):
        self.solids.append(solid)
        self.solid_rotations.append(np.identity(3) if rotation is None else np.asarray(rotation))
        self.solid_displacements.append(np.zeros(3) if displacement is None else np.asarray(displacement))
        return len(self.solids) - 1

    def flatten(self):
        verts, tris, offset = [], [], 0
        for s, r, d in zip(self.solids, self.solid_rotations, self.solid_displacements):
            verts.append(s.mesh.vertices @ r.T + d)
            tris.append(s.mesh.triangles + offset)
            offset += len(s.mesh.vertices)
        self.mesh = Mesh(np.concatenate(verts), np.concatenate(tris))
        self.solid_id = np.concatenate([np.full(len(s.mesh.triangles), i, np.int32) for i, s in enumerate(self.solids)])
        m1 = np.concatenate([s.material1 for s in self.solids])
        m2 = np.concatenate([s.material2 for s in self.solids])
        surf = np.concatenate([s.surface for s in self.solids])
        self.unique_materials = list({id(m): m for m in np.concatenate([m1, m2])}.values())
        mi = {id(m): i for i, m in enumerate(self.unique_materials)}
        self.material1_index = np.array([mi[id(m)] for m in m1], np.int32)
        self.material2_index = np.array([mi[id(m)] for m in m2], np.int32)
        self.unique_surfaces = list({id(s): s for s in surf if s is not None}.values())
        si = {id(s): i for i, s in enumerate(self.unique_surfaces)}
        self.surface_index = np.array([si[id(s)] if s is not None else -1 for s in surf], np.int32)
        return self
