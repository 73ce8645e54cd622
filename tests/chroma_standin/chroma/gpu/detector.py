class GPUDetector:
    def __init__(self, detector):
        if detector.mesh is None:
            detector.flatten()
        self.detector = detector
        self.n_channels = len(detector.channel_index_to_solid_id)
        self.gpudata = object()
