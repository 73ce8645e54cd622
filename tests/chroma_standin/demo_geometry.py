"""A small detector built through the Chroma API (stand-in): water sphere, black wall, 6 PMTs."""

import numpy as np
import trimesh

from chroma.detector import Detector
from chroma.geometry import Material, Mesh, Solid, Surface, standard_wavelengths


def build():
    water = Material("water")
    water.set("refractive_index", 1.33)
    water.set("absorption_length", np.linspace(1e4, 3e4, len(standard_wavelengths)))
    water.set("scattering_length", 5e4)
    glass = Material("glass")
    glass.set("refractive_index", 1.49)
    glass.set("absorption_length", 1e3)
    glass.set("scattering_length", 1e6)
    glass.comp_reemission_prob = [np.array([[400.0, 0.1]])]  # reported as not modelled
    black = Surface("black")
    black.set("absorb", 1.0)
    cathode = Surface("cathode")
    cathode.set("detect", 0.25)
    cathode.set("absorb", 0.25)
    cathode.set("reflect_diffuse", 0.5)
    coated = Surface("coated", model=2)  # thin film: reported as not modelled
    coated.set("absorb", 0.5)
    coated.set("reflect_specular", 0.5)
    det = Detector(water)
    wall = trimesh.creation.icosphere(subdivisions=2, radius=3000.0)
    det.add_solid(Solid(Mesh(wall.vertices, wall.faces), water, water, black))
    pmt = trimesh.creation.icosphere(subdivisions=1, radius=100.0)
    for k, d in enumerate(np.eye(3).tolist() + (-np.eye(3)).tolist()):
        det.add_pmt(Solid(Mesh(pmt.vertices, pmt.faces), glass, water, cathode), displacement=np.array(d) * 2000.0,
                    channel_type=k % 2)
    ring = trimesh.creation.annulus(r_min=50.0, r_max=80.0, height=5.0)
    det.add_solid(Solid(Mesh(ring.vertices, ring.faces), water, water, coated), displacement=np.array([0, 0, -500.0]))
    det.flatten()
    return det
