"""GPTConfig: the model's shape, named exactly like OpenAI's hparams.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPTConfig:
    n_vocab: int = 50257   # V: vocabulary size
    n_ctx: int = 1024      # maximum sequence length (positions)
    n_embd: int = 768      # C: channels
    n_head: int = 12       # NH: attention heads (hs = C // NH)
    n_layer: int = 12      # L: transformer blocks
    dropout: float = 0.0   # embedding, attention-probability and residual dropout

    def __post_init__(self):
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; choose one of {sorted(PRESETS) + sorted(PRESET_ALIASES)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_hparams(cls, hp: dict, **overrides) -> "GPTConfig":
        """From OpenAI's hparams.json dict (keys n_vocab, n_ctx, n_embd, n_head, n_layer)."""
        missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in hp]
        if missing:
            raise ValueError(f"hparams is missing {missing}")
        return cls(**{k: hp[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}, **overrides)

    def to_hparams(self) -> dict:
        d = asdict(self)
        d.pop("dropout")
        return d

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# Every model shape npgpt names, in one table. The GPT-2 sizes are OpenAI's released models (their
# full config); tiny and small are body shapes for training from scratch (`npgpt train --config`),
# whose vocabulary and context the data and --context decide.
SMALL_SHAPES = {
    "tiny":  dict(n_layer=2, n_head=2, n_embd=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384),
}
PRESETS = {
    "gpt2":        dict(n_vocab=50257, n_ctx=1024, n_embd=768,  n_head=12, n_layer=12),  # 124M
    "gpt2-medium": dict(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),  # 355M
    "gpt2-large":  dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),  # 774M
    "gpt2-xl":     dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),  # 1558M
}
EOT_ID = 50256              # GPT-2's <|endoftext|>: a text's end, and the padding of fine-tuning batches
HF_PREFIX = "transformer."  # what Hugging Face's GPT2LMHeadModel puts before the body's parameter names
PRESET_ALIASES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
MODEL_NAMES = ", ".join([*PRESETS, *PRESET_ALIASES])   # for messages: what load_model accepts by name
