"""interop.fingerprint: seeded random-projection fingerprints, identical across numpy, jax and torch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from interop import Fingerprinter

jax.config.update("jax_platforms", "cpu")

KINDS = {"numpy": np.asarray, "jax": jnp.asarray, "torch": torch.as_tensor}
ARRAY_TYPES = {"numpy": np.ndarray, "jax": jax.Array, "torch": torch.Tensor}


def host(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def reference_fingerprint(x, projection, pool_axes):
    """float64 numpy: mean-pool, project, L2-normalise."""
    y = np.asarray(x, np.float64).mean(axis=pool_axes) @ projection
    norm = np.linalg.norm(y, axis=-1, keepdims=True)
    return y / np.where(norm > 0, norm, 1.0)


@pytest.fixture
def activations():
    return np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_matches_float64_reference_and_keeps_the_input_kind(kind, activations):
    fp = Fingerprinter(16, dim=8, seed=3)
    out = fp(KINDS[kind](activations))
    assert isinstance(out, ARRAY_TYPES[kind])
    assert str(out.dtype).endswith("float32")
    np.testing.assert_allclose(host(out), reference_fingerprint(activations, fp.projection, (1,)), atol=2e-6)


def test_jax_fingerprint_under_jit_equals_eager(activations):
    fp = Fingerprinter(16, dim=8)
    x = jnp.asarray(activations)
    jitted = jax.jit(lambda a: fp(a))(x)
    chex.assert_shape(jitted, (3, 8))
    chex.assert_type(jitted, jnp.float32)
    chex.assert_trees_all_close(jitted, fp(x), atol=1e-6)


def test_same_seed_gives_the_same_projection_and_different_seeds_differ():
    a, b, c = Fingerprinter(32, 8, seed=1), Fingerprinter(32, 8, seed=1), Fingerprinter(32, 8, seed=2)
    np.testing.assert_array_equal(a.projection, b.projection)
    assert not np.allclose(a.projection, c.projection)
    assert a.projection.dtype == np.float64 and a.projection.shape == (32, 8)


def test_projection_entries_have_standard_deviation_one_over_sqrt_dim():
    projection = Fingerprinter(512, dim=64, seed=0).projection
    assert abs(projection.std() - 1 / 8) < 0.01
    assert abs(projection.mean()) < 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprints_are_unit_vectors(kind, activations):
    out = host(Fingerprinter(16, dim=8)(KINDS[kind](activations)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_activations_give_a_zero_fingerprint_not_nan(kind):
    out = host(Fingerprinter(16, dim=8)(KINDS[kind](np.zeros((2, 5, 16), np.float32))))
    np.testing.assert_array_equal(out, np.zeros((2, 8)))


@pytest.mark.parametrize("kind", KINDS)
def test_nhwc_activations_pool_over_height_and_width(kind):
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 16)).astype(np.float32)
    fp = Fingerprinter(16, dim=8)
    out = fp(KINDS[kind](x), pool_axes=(1, 2))
    assert tuple(out.shape) == (2, 8)
    np.testing.assert_allclose(host(out), reference_fingerprint(x, fp.projection, (1, 2)), atol=2e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_excludes_padded_positions(kind, activations):
    x = activations.copy()
    x[0, 4:] = 1e3  # padding garbage that must not leak into the fingerprint
    mask = np.ones((3, 7), np.float32)
    mask[0, 4:] = 0
    mask[2, :] = 0
    fp = Fingerprinter(16, dim=8)
    out = host(fp(KINDS[kind](x), mask=KINDS[kind](mask)))
    np.testing.assert_allclose(out[0], host(fp(KINDS[kind](x[:1, :4])))[0], atol=2e-6)
    np.testing.assert_allclose(out[1], host(fp(KINDS[kind](x[1:2])))[0], atol=2e-6)
    np.testing.assert_array_equal(out[2], np.zeros(8))


@pytest.mark.parametrize("kind", KINDS)
def test_combine_is_the_normalised_mean_of_layer_fingerprints(kind):
    rng = np.random.default_rng(2)
    layer_a = Fingerprinter(16, dim=8, seed=0)(rng.standard_normal((2, 5, 16)).astype(np.float32))
    layer_b = Fingerprinter(24, dim=8, seed=1)(rng.standard_normal((2, 5, 24)).astype(np.float32))
    combined = Fingerprinter.combine([KINDS[kind](layer_a), KINDS[kind](layer_b)])
    assert isinstance(combined, ARRAY_TYPES[kind])
    expected = (layer_a + layer_b) / np.linalg.norm(layer_a + layer_b, axis=-1, keepdims=True)
    np.testing.assert_allclose(host(combined), expected, atol=1e-6)


def test_input_dtype_is_kept_for_floats_and_integers_get_the_default_float():
    fp = Fingerprinter(4, dim=2)
    assert fp(np.ones((3, 4), np.float64)).dtype == np.float64
    assert fp(torch.ones((3, 4), dtype=torch.float16)).dtype == torch.float16
    assert fp(torch.ones((3, 4), dtype=torch.int64)).dtype == torch.float32


def test_wrong_channel_count_and_channel_pooling_are_rejected_with_the_expected_shape():
    fp = Fingerprinter(16, dim=8)
    with pytest.raises(ValueError, match=r"expected activations \[\.\.\., 16\]"):
        fp(np.zeros((2, 5, 12)))
    with pytest.raises(ValueError, match="other than the last"):
        fp(np.zeros((2, 5, 16)), pool_axes=(-1,))
    with pytest.raises(ValueError, match="does not broadcast"):
        fp(np.zeros((2, 5, 16)), mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="positive int"):
        Fingerprinter(0)
