import numpy as np

from .geometry import Geometry


class Detector(Geometry):
    def __init__(self, detector_material=None):
        super().__init__(detector_material)
        self.solid_id_to_channel_index = np.zeros(0, np.int32)
        self.channel_index_to_solid_id = np.zeros(0, np.int32)
        self.channel_index_to_channel_type = np.zeros(0, np.int32)

    def add_pmt(self, pmt, rotation=None, displacement=None, channel_type=None):
        solid_id = self.add_solid(pmt, rotation, displacement)
        n = len(self.channel_index_to_solid_id)
        if len(self.solid_id_to_channel_index) <= solid_id:
            grown = np.full(solid_id + 1, -1, np.int32)
            grown[: len(self.solid_id_to_channel_index)] = self.solid_id_to_channel_index
            self.solid_id_to_channel_index = grown
        self.solid_id_to_channel_index[solid_id] = n
        self.channel_index_to_solid_id = np.append(self.channel_index_to_solid_id, solid_id).astype(np.int32)
        self.channel_index_to_channel_type = np.append(self.channel_index_to_channel_type,
                                                       0 if channel_type is None else channel_type).astype(np.int32)
        return {"solid_id": solid_id, "channel_index": n}
