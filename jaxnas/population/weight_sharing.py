"""Weight-sharing training of one supernet on the subnets a `SubnetSampler` draws each step (uniform, or the
sandwich rule: largest, smallest and random subnets, gradients averaged; optional in-place distillation from the
largest)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas.data import epoch_indices
from jaxnas.population.common import Apply, shifted


@dataclasses.dataclass(frozen=True)
class SubnetSampler:
    """Draws the subnets one weight-sharing step trains: ``sampler(key) -> [n, n_choices] int32``.

    ``rule="uniform"``: n uniform samples of ``space``. ``rule="sandwich"``: the largest and the smallest
    subnet plus n - 2 uniform ones (largest / smallest are the family's ``enc -> enc`` maps, e.g.
    `MLPSupernet.largest`, applied to fresh samples so their categorical choices vary). Hashable, so it can be
    a static argument of jit.
    """

    space: object
    n: int
    rule: str = "sandwich"
    largest: Callable[[jax.Array], jax.Array] | None = None
    smallest: Callable[[jax.Array], jax.Array] | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("uniform", "sandwich"):
            raise ValueError(f"rule must be 'uniform' or 'sandwich', got {self.rule!r}")
        if self.rule == "sandwich" and (self.n < 2 or self.largest is None or self.smallest is None):
            raise ValueError(
                f"the sandwich rule needs n >= 2 (got {self.n}) and both largest and smallest, e.g. "
                "SubnetSampler(space, 4, 'sandwich', supernet.largest, supernet.smallest)"
            )
        if self.n < 1:
            raise ValueError(f"n must be >= 1 subnets per step, got {self.n}")

    def __call__(self, key: jax.Array) -> jax.Array:
        encs = self.space.sample(key, self.n)
        if self.rule == "uniform":
            return encs
        return jnp.concatenate([self.largest(encs[:1]), self.smallest(encs[1:2]), encs[2:]])


def train_supernet(
    apply: Apply,
    params,
    optimizer: optax.GradientTransformation,
    sampler: SubnetSampler,
    train_x: jax.Array,
    train_y: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    opt_state=None,
    distill: float = 0.0,
    shift: int = 0,
) -> tuple[object, object, np.ndarray]:
    """Weight-sharing training: every step trains the shared ``params`` on ``sampler``'s subnets.

    The step's loss is the mean over the sampled subnets of their batch loss, so its gradient is the average of
    the subnets' gradients. A subnet's loss is its cross-entropy with the labels; with ``distill`` > 0 (in-place
    distillation, BigNAS / OFA: needs the sandwich rule, whose first subnet is the largest) every other subnet's
    is ``(1 - distill) * CE(labels) + distill * CE(largest's soft predictions)``, the teacher's predictions taken
    in the same step and not differentiated through. ``shift``: random translations of the batch by up to that
    many pixels (as `train_population`). Each epoch is one jitted `lax.scan` over the batches of
    ``epoch_indices(N, batch_size, seed, epoch)``; subnets and dropout are drawn from ``key(seed)``. A learning
    rate schedule belongs in ``optimizer`` (its step count is the optimiser state's, so it continues on resume).
    Returns ``(params, opt_state, loss [epochs, n_batches, n] per step and subnet: cross-entropy with the labels)``.
    """
    if distill and (sampler.rule != "sandwich" or not 0.0 < distill <= 1.0):
        raise ValueError(f"distill={distill} needs the sandwich rule (its first subnet is the teacher) and a weight "
                         "in (0, 1]")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    losses = []
    for epoch in range(epochs):
        index = jnp.asarray(epoch_indices(train_x.shape[0], batch_size, seed, epoch))
        key = jax.random.fold_in(jax.random.key(seed), epoch)
        params, opt_state, loss = _supernet_epoch(
            apply, optimizer, sampler, float(distill), int(shift), params, opt_state, key, train_x, train_y, index
        )
        losses.append(np.asarray(loss))
    return params, opt_state, np.stack(losses)


@functools.partial(jax.jit, static_argnames=("apply", "optimizer", "sampler", "distill", "shift"))
def _supernet_epoch(apply, optimizer, sampler, distill, shift, params, opt_state, key, x, y, index):
    def mean_loss(params, encs, xb, yb, keys):
        logits = jax.vmap(lambda enc, k: apply(params, enc, xb, train=True, key=k))(encs, keys)
        ce = jax.vmap(lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, yb).mean())(logits)
        if not distill:
            return ce.mean(), ce
        teacher = jax.nn.softmax(jax.lax.stop_gradient(logits[0]))
        kd = jax.vmap(lambda lg: optax.softmax_cross_entropy(lg, teacher).mean())(logits[1:])
        student = (1.0 - distill) * ce[1:] + distill * kd
        return jnp.concatenate([ce[:1], student]).mean(), ce

    def step(carry, data):
        params, opt_state = carry
        rows, step_key = data
        sample_key, dropout_key = jax.random.split(step_key)
        encs = sampler(sample_key)
        keys = jax.random.split(dropout_key, encs.shape[0])
        xb = shifted(jax.random.fold_in(step_key, 2), x[rows], shift) if shift else x[rows]
        grads, losses = jax.grad(mean_loss, has_aux=True)(params, encs, xb, y[rows], keys)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), losses

    keys = jax.random.split(key, index.shape[0])
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (index, keys))
    return params, opt_state, losses

