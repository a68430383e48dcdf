"""Binary activation codes of a batch, accumulated into NASWOT's kernel while a supernet runs.

NASWOT ("Neural Architecture Search without Training", Mellor et al., ICML 2021) scores an untrained network by
how differently it maps the inputs of one batch: every ReLU unit gives each input a bit (pre-activation > 0),
and ``K[i, j]`` counts the units on which inputs i and j agree; the score is ``log |det K|``. The supernets
call `ActivationCodes.add` at each activation of the candidate, with a mask of the units the candidate really
has (a masked-out channel or an inactive block would otherwise agree on every pair and inflate K); the other
activation functions of our spaces (gelu, silu, ...) are coded by the same sign test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class ActivationCodes:
    """Accumulates ``K [B, B]`` = sum over recorded units of [code_i == code_j] (only units where valid)."""

    def __init__(self, batch: int):
        self.kernel = jnp.zeros((batch, batch), jnp.float32)

    def add(self, z: jax.Array, valid: jax.Array | bool = True) -> None:
        """Record pre-activations ``z`` [B, ...] (bit: z > 0); ``valid`` (broadcast to z.shape[1:]) marks the
        units the candidate has."""
        v = jnp.broadcast_to(jnp.asarray(valid, jnp.float32), z.shape[1:]).reshape(-1)
        on = (z > 0).reshape(z.shape[0], -1).astype(jnp.float32) * v
        off = v - on  # valid units that are off
        self.kernel = self.kernel + on @ on.T + off @ off.T
