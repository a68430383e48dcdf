"""KV-cache plumbing that works across transformers releases.

Current transformers pass a cache to a causal LM's forward as ``cache=`` and return it as ``output.cache``;
earlier releases use ``past_key_values=`` for both. Everything here picks whichever the installed model
class accepts, so callers never pass a deprecated keyword.
"""

from __future__ import annotations

import functools
import inspect

import torch


def with_cache(model: torch.nn.Module, cache) -> dict:
    """``{keyword: cache}`` passing a KV cache to ``model``'s forward: ``cache=`` in current transformers,
    ``past_key_values=`` in earlier releases (deprecated since; both are supported by our pin)."""
    return {_cache_keyword(type(model)): cache}


def forward_cached(model: torch.nn.Module, ids: torch.Tensor, cache, **kwargs):
    """``model``'s output on ``ids`` following the tokens held in the KV ``cache`` (which it extends)."""
    return model(input_ids=ids, **with_cache(model, cache), use_cache=True, **kwargs)


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned: ``output.cache`` (current transformers) or ``output.past_key_values``."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def rewind(cache, n_tokens: int) -> None:
    """Cut the KV cache back to its first ``n_tokens`` (transformers takes the number to remove, negated)."""
    cache.crop(n_tokens - cache.get_seq_length())
