"""npgpt: GPT-2 from scratch in NumPy, with every backward pass written by hand."""
from .config import GPTConfig
from .generate import generate, generate_text, stream_text, stream_tokens
from .gradcheck import gradcheck_layer, gradcheck_model
from .loss import cross_entropy
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_schedule

__version__ = "0.1.0"
__all__ = ["GPTConfig", "GPT", "cross_entropy", "AdamW", "clip_grad_norm", "lr_schedule",
           "gradcheck_layer", "gradcheck_model",
           "generate", "generate_text", "stream_tokens", "stream_text"]
