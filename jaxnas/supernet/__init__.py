"""Weight-sharing supernets: an encoding becomes masks inside jit; each subnet has an exact standalone twin."""

from jaxnas.supernet.mlp import ACTIVATION_FNS, MLPSupernet, TwinMLP

__all__ = ["ACTIVATION_FNS", "MLPSupernet", "TwinMLP"]
