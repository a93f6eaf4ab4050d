"""placeholder"""
class FusedEngine:
    name = "fused"
    device_step = True
    def unsupported(self, composition, group):
        return "fused kernels need CUDA tensors"
