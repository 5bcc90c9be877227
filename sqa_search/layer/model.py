"""The proxy language model the quality trials train: the SQA paper's dense setup, smaller.

Tied token embedding, pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU ->
residual), RoPE inside the attention layer. A decoder (next-token LM) when the spec is causal,
an encoder otherwise. One file, no framework layers between the reader and the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SparseQueryAttention
from .spec import AttentionSpec, SpecError

__all__ = ["ModelConfig", "ProxyLM", "Block", "MODEL_PRESETS"]


@dataclass(frozen=True)
class ModelConfig:
    attention: AttentionSpec
    n_layers: int = 4
    d_ff: int | None = None  # SwiGLU hidden size; default 8/3 * d_model rounded up to 32
    vocab_size: int = 256  # byte-level by default
    norm_eps: float = 1e-6
    backend: str = "auto"  # attention backend, see SparseQueryAttention

    def __post_init__(self) -> None:
        if not isinstance(self.attention, AttentionSpec):
            raise SpecError(f"ModelConfig.attention must be an AttentionSpec, got {type(self.attention).__name__}")
        for name, low in (("n_layers", 1), ("vocab_size", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError(f"ModelConfig.{name}={value!r} is not allowed: must be an integer >= {low}")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", -(-(8 * self.d_model // 3) // 32) * 32)
        if isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise SpecError(f"ModelConfig.d_ff={self.d_ff!r} is not allowed: must be an integer >= 1")

    @property
    def d_model(self) -> int:
        return self.attention.d_model

    @property
    def causal(self) -> bool:
        return self.attention.causal

    def n_params(self) -> int:
        """Parameters of the model, analytically (tied embedding counted once)."""
        d = self.d_model
        per_block = self.attention.n_params() + 3 * d * self.d_ff + 2 * d
        return self.vocab_size * d + self.n_layers * per_block + d


# Named model sizes looked up by name (the attention spec is given separately).
MODEL_PRESETS: dict[str, dict] = {
    # small enough for a quick study on a 2-core CPU
    "quickstart": dict(d_model=128, n_heads=8, n_layers=4),
    # the SQA paper's dense model: 8 layers, d=256, 16 heads
    "paper_dense": dict(d_model=256, n_heads=16, n_layers=8),
}


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = SparseQueryAttention(config.attention, backend=config.backend)
        self.ff_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ff = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class ProxyLM(nn.Module):
    """Token ids (B, N) -> logits (B, N, vocab). Loss is cross-entropy against `targets`
    (ignore index -100): next tokens for a decoder, masked positions for an encoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.apply(self._init_weights)
        # GPT-2 style: scale residual projections by depth so the stream's variance stays put
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.ff.down):
                nn.init.normal_(proj.weight, std=0.02 / (2 * config.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def attention_layers(self) -> list[SparseQueryAttention]:
        return [b.attn for b in self.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.norm(x), self.embed.weight)  # tied embedding
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss


def build_model(spec: AttentionSpec, preset: str | None = None, **overrides) -> ProxyLM:
    """A proxy model for `spec`; `preset` names a size in MODEL_PRESETS for n_layers."""
    fields = {}
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise SpecError(f"model preset={preset!r} is not known: choose one of {', '.join(MODEL_PRESETS)}")
        fields["n_layers"] = MODEL_PRESETS[preset]["n_layers"]
    fields.update(overrides)
    return ProxyLM(ModelConfig(attention=spec, **fields))
