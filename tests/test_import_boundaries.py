"""The package boundaries: jaxnas never imports torch; torch_gating never imports jax; interop imports neither.

Each check runs in a fresh interpreter so nothing imported by other tests can hide a violation.
Every submodule is imported, not just the package, so a lazy import deep inside is caught too.
"""

import json
import subprocess
import sys

import pytest

PROBE = r"""
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
roots = {name.split(".")[0] for name in sys.modules}
print(json.dumps(sorted(roots & {"jax", "jaxlib", "flax", "torch"})))
"""


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("interop", {"jax", "jaxlib", "flax", "torch"}),
        ("jaxnas", {"torch"}),
        ("torch_gating", {"jax", "jaxlib", "flax"}),
    ],
)
def test_package_does_not_import_the_other_framework(package, forbidden):
    out = subprocess.run([sys.executable, "-c", PROBE, package], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not (imported & forbidden), f"importing {package} pulled in {sorted(imported & forbidden)}"
