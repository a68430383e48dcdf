"""jaxnas.blocks: one declaration per conv block family, every form derived from it.

The worked example of docs/architecture.md (a new family appended to jaxnas/blocks.py and nothing else) is run in
a fresh interpreter on a copy of the package: the new family's twin equals its masked supernet, the sized backend
scores it as the masked one does, its analytic parameter count is the twin's, and the config accepts it.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxnas import blocks
from jaxnas.blocks import FAMILIES, Conv, Family

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_is_in_the_space_and_config_with_what_it_declares():
    from jaxnas.config import SpaceConfig
    from jaxnas.spaces import macro

    assert macro.CONV_FAMILIES == tuple(FAMILIES) == ("cnn", "resnet", "mobilenet")
    assert SpaceConfig().families == ("mlp", *FAMILIES)
    assert macro.SKIP_FAMILIES == ("mlp", "cnn") and macro.EXPANSION_FAMILIES == ("mobilenet",)
    space = macro.macro_space(families=("cnn", "resnet"))
    assert "stage1.expansion" not in space.names and "stage1.skip" in space.names
    space = macro.macro_space(families=("resnet", "mobilenet"))
    assert "stage1.expansion" in space.names and "stage1.skip" not in space.names


def test_layers_give_sizes_positions_and_norms_of_each_family():
    # mobilenet block 1: the 1x1 expansion runs at the input resolution, before the strided depthwise layer.
    got = blocks.layers(FAMILIES["mobilenet"], True, 8, 16, 5, 3, True, (64, 16))
    assert got == [(1, 8, 24, False, 64, True), (5, 24, 24, True, 16, True), (1, 24, 16, False, 16, True)]
    got = blocks.layers(FAMILIES["resnet"], True, 8, 16, 3, 1, False, (64, 16))
    assert got == [(3, 8, 16, False, 16, False), (3, 16, 16, False, 16, False), (1, 8, 16, False, 16, False)]
    assert [c.name for c in FAMILIES["resnet"].layers(False)] == ["conv1", "conv2"]  # identity shortcut after block 1
    assert FAMILIES["mobilenet"].norms(True) == {"expand_norm": "hidden", "depthwise_norm": "hidden",
                                                 "project_norm": "out"}
    assert Conv("c", "hidden", "hidden", depthwise=True).kernel_shape(3, blocks.widths(4, 8, 2)) == (3, 3, 1, 8)


def test_bad_declarations_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="n_in / n_out must be one of"):
        Conv("c", "inner")
    with pytest.raises(ValueError, match="odd int"):
        Conv("c", kernel=2)
    with pytest.raises(ValueError, match="maps a width to itself"):
        Conv("c", "in", "out", depthwise=True)

    def forward(ops, h, first):
        return h

    with pytest.raises(ValueError, match="distinct names"):
        Family("twice", lambda first: (Conv("a", norm="a"),), forward).convs(True)
    with pytest.raises(ValueError, match="none of"):
        Family("reserved", lambda first: (Conv("skip"),), forward).convs(True)
    with pytest.raises(ValueError, match="must read the block's input"):
        Family("hidden_first", lambda first: (Conv("a", "out", "out"),), forward).convs(True)


CHECK_NEW_FAMILY = textwrap.dedent(
    """
    import os
    import jax, jax.flatten_util, jax.numpy as jnp, numpy as np
    import jaxnas
    from interop.config import load_config
    from jaxnas.config import RunConfig
    from jaxnas.population import sized
    from jaxnas.spaces import macro_space
    from jaxnas.supernet import ConvSupernet

    assert jaxnas.__file__.startswith(os.getcwd()), jaxnas.__file__  # the copy with the appended family
    cfg = load_config(RunConfig, None, ["space.families=[cnn,fused]"])
    assert cfg.space.families == ("cnn", "fused"), cfg.space.families
    space = macro_space(families=("cnn", "fused"), max_stages=2, max_depth=2, channels=(4, 8), kernels=(1, 3),
                        expansions=(1, 2), dropouts=(0.0,), norms=(True,))
    assert "stage1.expansion" in space.names
    net = ConvSupernet(space, (8, 8, 1), 3)
    params = net.init(jax.random.key(0))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    params = unravel(flat + 0.3 * jax.random.normal(jax.random.key(1), flat.shape))  # non-trivial norms
    x = jax.random.normal(jax.random.key(2), (16, 8, 8, 1))
    y = jnp.arange(16) % 3
    bn = x.reshape(2, 8, 8, 8, 1)
    encs = np.asarray(space.sample(jax.random.key(3), 64))
    encs = encs[space.unique(encs)]
    encs = encs[[net.arch(e).family == "fused" for e in encs]][:3]
    assert len(encs) == 3
    got = sized.evaluate_sized(net, params, encs, x, y, bn_batches=bn)
    for i, enc in enumerate(encs):
        stats = net.recalibrate_bn(params, jnp.asarray(enc), bn)
        twin_params, twin = net.extract(params, jnp.asarray(enc), stats)
        want = net.apply(params, jnp.asarray(enc), x, train=False, bn_stats=stats)
        np.testing.assert_allclose(twin(x), want, rtol=1e-4, atol=1e-4)
        assert sum(leaf.size for leaf in jax.tree.leaves(twin_params)) == net.param_count(enc)
        loss = -jnp.mean(jax.nn.log_softmax(want)[jnp.arange(16), y])
        np.testing.assert_allclose(got["loss"][i], loss, rtol=2e-5, atol=2e-5)
    print("fused family ok")
    """
)


def test_the_documented_new_family_touches_one_file_and_works_in_every_form(tmp_path):
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Adding a conv block family"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(ROOT / "jaxnas", tmp_path / "jaxnas", ignore=shutil.ignore_patterns("__pycache__", "*.csv"))
    shutil.copytree(ROOT / "interop", tmp_path / "interop", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "jaxnas" / "blocks.py", "a") as f:
        f.write("\n\n" + example)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", CHECK_NEW_FAMILY], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fused family ok" in done.stdout
