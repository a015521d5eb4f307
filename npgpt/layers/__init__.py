"""The layers GPT-2 is built from; each has forward (keeps a cache, unless under no_grad) and backward (adds into .grad)."""
from .attention import CausalSelfAttention
from .block import Block
from .dropout import Dropout
from .embedding import Embedding, PositionEmbedding, TiedLMHead
from .gelu import GELU
from .last_token import LastTokenHead
from .layernorm import LayerNorm
from .linear import Linear
from .lora import LoRALinear
from .mlp import MLP
from .module import Module, Parameter

__all__ = ["Module", "Parameter", "Linear", "LayerNorm", "GELU", "Dropout", "Embedding", "PositionEmbedding",
           "TiedLMHead", "LastTokenHead", "LoRALinear", "CausalSelfAttention", "MLP", "Block"]
