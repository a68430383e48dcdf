"""Weight-sharing supernets: an encoding becomes masks inside jit; each subnet has an exact standalone twin."""

from jaxnas.supernet.conv import ConvSupernet, TwinConvNet
from jaxnas.supernet.lm import LMSupernet, TwinLM
from jaxnas.supernet.mlp import ACTIVATION_FNS, MLPSupernet, TwinMLP
from jaxnas.supernet.nb201 import NB201Supernet, TwinNB201
from jaxnas.supernet.transformer import TransformerSupernet, TwinTransformer

__all__ = [
    "ACTIVATION_FNS",
    "ConvSupernet",
    "LMSupernet",
    "MLPSupernet",
    "NB201Supernet",
    "TransformerSupernet",
    "TwinConvNet",
    "TwinLM",
    "TwinMLP",
    "TwinNB201",
    "TwinTransformer",
]
