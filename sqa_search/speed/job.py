"""The thing a timing times: a module, its inputs and one step (`Job`), built for a spec at a shape.

Scope ``layer`` times the attention layer, ``block`` a transformer block, ``model`` the proxy LM.
Mode ``train`` is forward + backward against a fixed random output gradient, ``prefill`` a forward
without grad, ``decode`` one new token against a KV cache holding N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layer.attention import SparseQueryAttention
from ..layer.model import Block, ModelConfig, ProxyLM

__all__ = ["Job", "build_job"]


@dataclass
class Job:
    step: callable  # the timed call
    before: callable  # untimed, before every call (zero grads, reset the cache length)
    observe: callable  # the backend string(s) the last call ran on
    resident_bytes: int  # weights, inputs and cache that live across calls
    kv_cache_tokens: int | None = None


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def build_job(spec, *, what, mode, batch, seq_len, n_layers, d_ff, backend, device, dtype, seed) -> Job:
    """The module, its inputs and the step to time, for one spec at one shape and mode."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    b, n, d = batch, seq_len, spec.d_model
    if what == "layer":
        module = SparseQueryAttention(spec, backend=backend)
        attn_layers = [module]
    else:
        cfg_fields = {"attention": spec, "backend": backend}
        if d_ff is not None:
            cfg_fields["d_ff"] = d_ff
        if what == "block":
            module = Block(ModelConfig(**cfg_fields))
            attn_layers = [module.attn]
        else:
            module = ProxyLM(ModelConfig(n_layers=n_layers, **cfg_fields))
            attn_layers = module.attention_layers
    module = module.to(device=device, dtype=dtype)
    params = list(module.parameters()) + list(module.buffers())

    def observe() -> str:
        names = []
        for layer in attn_layers:
            name = layer.last_backend or "unknown"
            if name not in names:
                names.append(name)
        return ",".join(names)

    def reset_backend():
        for layer in attn_layers:
            layer.last_backend = None

    if mode == "decode":
        return _build_decode(module, attn_layers, what, b, n, d, randn, gen, device, params, observe, reset_backend)

    step, before, inputs = _forward_step(module, what, mode, b, n, d, randn, gen, device, reset_backend)
    return Job(step, before, observe, _tensor_bytes(params + inputs))


def _forward_step(module, what, mode, b, n, d, randn, gen, device, reset_backend):
    """(step, before, inputs) of a prefill or train step: forward (and backward) over N tokens."""
    if what == "model":
        vocab = module.config.vocab_size
        idx = torch.randint(0, vocab, (b, n), generator=gen).to(device)
        inputs = [idx]
        if mode == "prefill":
            def step():
                with torch.inference_mode():
                    module(idx)
            before = reset_backend
        else:
            targets = torch.randint(0, vocab, (b, n), generator=gen).to(device)
            inputs.append(targets)

            def step():
                _, loss = module(idx, targets)
                loss.backward()

            def before():
                module.zero_grad(set_to_none=True)
                reset_backend()
    else:
        x = randn(b, n, d)
        inputs = [x]
        if mode == "prefill":
            def step():
                with torch.inference_mode():
                    module(x)
            before = reset_backend
        else:
            # a fixed random output gradient: backward of sum() would hand every kernel a
            # constant gradient, which is not what training sees
            x.requires_grad_(True)
            grad_out = randn(b, n, d)
            inputs.append(grad_out)

            def step():
                module(x).backward(grad_out)

            def before():
                module.zero_grad(set_to_none=True)
                x.grad = None
                reset_backend()

    return step, before, inputs


def _build_decode(module, attn_layers, what, b, n, d, randn, gen, device, params, observe, reset_backend) -> Job:
    """One new token against caches that hold N tokens (a window holds min(N, W)).

    The caches get capacity N + 1 and are filled from an N-token prompt (untimed); before
    every repeat their length is set back to N, so each timed call decodes position N.
    Block and model decode follow Block.forward / ProxyLM.forward with the layer's decode.
    """
    caches = [layer.new_cache(b, n + 1) for layer in attn_layers]
    with torch.inference_mode():
        if what == "layer":
            prompt = randn(b, n, d)
            module.prefill_cache(prompt, caches[0])
            x_new = randn(b, 1, d)

            def step():
                with torch.inference_mode():
                    module.decode(x_new, caches[0])
        elif what == "block":
            prompt = randn(b, n, d)
            module.attn.prefill_cache(module.attn_norm(prompt), caches[0])
            x_new = randn(b, 1, d)

            def step():
                with torch.inference_mode():
                    h = x_new + module.attn.decode(module.attn_norm(x_new), caches[0])
                    h + module.ff(module.ff_norm(h))
        else:
            vocab = module.config.vocab_size
            idx = torch.randint(0, vocab, (b, n), generator=gen).to(device)
            h = module.embed(idx)
            for block, cache in zip(module.blocks, caches):
                block.attn.prefill_cache(block.attn_norm(h), cache)
                h = block(h)
            token = torch.randint(0, vocab, (b, 1), generator=gen).to(device)
            x_new = token

            def step():
                with torch.inference_mode():
                    h = module.embed(token)
                    for block, cache in zip(module.blocks, caches):
                        h = h + block.attn.decode(block.attn_norm(h), cache)
                        h = h + block.ff(block.ff_norm(h))
                    F.linear(module.norm(h), module.embed.weight)

    def before():
        for cache in caches:
            cache.length = n
        reset_backend()

    before()
    cache_tensors = [t for c in caches for t in (c.k, c.v)]
    resident = _tensor_bytes(params + cache_tensors + [x_new])
    return Job(step, before, observe, resident, kv_cache_tokens=caches[0].filled)
