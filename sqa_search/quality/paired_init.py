"""Paired (common random number) initialisation: candidates trained from one seed share weights.

Comparing two head configurations by their losses after one seed each mixes the difference between
the configurations with the difference between two unrelated initialisations. Here every
parameter is drawn from its own generator, seeded by ``(seed, parameter name)``, at the size the
*baseline* (MHA, ``n_heads`` query and key/value heads) would have; a candidate with fewer heads
takes the slice of its heads:

* ``q_proj``: the rows of the first ``n_q_heads`` heads of a full ``n_heads``-head draw;
* ``k_proj``/``v_proj``: the rows of the first ``n_kv_heads`` heads, likewise;
* ``o_proj``: the columns of the first ``n_attn_heads`` heads (the heads whose outputs it reads);
* everything else (embedding, norms, MLP, global tokens) has one shape for every candidate of a
  model, so it is the same tensor for the same seed.

The distributions are the model's own (`sqa_search.layer.model.ProxyLM`): normal(0, 0.02) for
linear weights and the embedding, normal(0, 0.02 / sqrt(2 n_layers)) for the residual projections
(``o_proj`` and ``ff.down``), zeros for biases, ones for norm weights, normal(0, 0.02) for global
tokens. Linear weights here do not scale with fan-in, so a slice of a draw has the distribution
of a draw of the slice: pairing changes which numbers a candidate gets, not their law.

The generators are CPU ``torch.Generator``s seeded from a hash of the name (not Python's salted
``hash``), so a seed gives the same weights in every process, on every device.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..layer.attention import SparseQueryAttention
from ..layer.model import ProxyLM

__all__ = ["paired_initialise", "parameter_seed", "INIT_STD"]

INIT_STD = 0.02  # ProxyLM._init_weights: every Linear weight and the embedding


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name`` under run seed ``seed`` (63 bits, stable)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _std(name: str, n_layers: int) -> float:
    """The init std of a weight, as ProxyLM sets it (residual projections scaled by depth)."""
    if name.endswith("attn.o_proj.weight") or name.endswith("ff.down.weight"):
        return INIT_STD / (2 * n_layers) ** 0.5
    return INIT_STD


def _full_shape(proj: str, param: torch.Tensor, spec) -> tuple[tuple[int, ...], int]:
    """(the baseline's shape of an attention projection's parameter, the dimension to slice).

    Only the attention projections differ between candidates; the baseline has ``n_heads`` heads
    on the head-grouped dimension: the output rows (and bias) of q/k/v, the input columns of o."""
    full = spec.n_heads * spec.head_dim
    if proj == "o_proj":
        return (param.shape[0], full), 1
    return (full,) + tuple(param.shape[1:]), 0


def _initial_value(name: str, param: torch.Tensor, module: nn.Module, attention, seed: int,
                   n_layers: int) -> torch.Tensor:
    """The initial value of parameter ``name`` (``param``) of ``module`` (``attention``: the attention
    layer the module is a projection of, else None): drawn at the baseline's shape, sliced to this one's."""
    if isinstance(module, nn.RMSNorm):
        return torch.ones(param.shape)
    if name.endswith(".bias"):
        return torch.zeros(param.shape)
    gen = torch.Generator().manual_seed(parameter_seed(seed, name))
    if attention is None:  # embedding, MLP, global tokens: one shape for every candidate
        return torch.randn(param.shape, generator=gen) * _std(name, n_layers)
    shape, dim = _full_shape(name.split(".")[-2], param, attention.spec)
    full = torch.randn(shape, generator=gen) * _std(name, n_layers)
    return full.narrow(dim, 0, param.shape[dim])


@torch.no_grad()
def paired_initialise(model: ProxyLM, seed: int) -> ProxyLM:
    """Re-initialise ``model`` in place from ``seed``, paired across head configurations; returns it."""
    n_layers = model.config.n_layers
    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        parent = modules.get(module_name.rpartition(".")[0]) if module_name else None
        attention = parent if isinstance(parent, SparseQueryAttention) and isinstance(module, nn.Linear) else None
        for local, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            value = _initial_value(name, param, module, attention, seed, n_layers)
            if value.shape != param.shape:
                raise RuntimeError(f"paired init drew {tuple(value.shape)} for {name} of shape {tuple(param.shape)}")
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return model
