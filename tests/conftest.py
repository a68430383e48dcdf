"""Test-wide environment: offline hubs, CPU JAX with 4 host devices, a private cache folder.

These must be set before jax / datasets / transformers are imported anywhere, hence module level.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# Tests compile hundreds of small programs and run each briefly: LLVM's optimisation passes cost more than they
# save (about half the compile time). Results are unchanged; benchmarks never run with this.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU's fusion emitters compile the masked supernets' many small fusions far slower than the classic LLVM
# emitters (measured in docs/benchmarks.md); same results up to float summation order.
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# No persistent XLA compilation cache: jax 0.10.2 segfaulted inside compilation_cache.put_executable_and_time
# (serialising a compiled program) in 3 of 4 fresh-clone CI runs, and the crashed xdist worker then hung the
# session. Every program is compiled in its own process.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
# One cache per test session, so tests never depend on (or pollute) the user's ~/.cache/jaxnas.
if "JAXNAS_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxnas-test-cache-")
    os.environ["JAXNAS_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


@pytest.fixture
def one_torch_thread():
    """Run a test with torch on one thread: tiny models gain nothing from a second one, and on a busy
    machine every op waits for it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after a test file once the worker holds a quarter of its memory-map cap.

    A worker runs dozens of files in one process; every program XLA:CPU compiles keeps memory mappings until JAX
    drops it, and a worker that reached the kernel's cap (vm.max_map_count, 65530) crashed (a segmentation fault
    while the failed compilation's C++ exception unwound; core dumps showed 65444 mappings). A file adds a few
    thousand at most, and releasing after every file (clear_caches + gc.collect) cost more than recompiling saved.
    """
    yield
    import sys

    if "jax" in sys.modules:
        from jaxnas.compiled import release_if_crowded

        release_if_crowded(share=0.25)


# The slowest test files (their tests' seconds summed, measured on an idle 2-core machine, 2026-12-05), slowest
# first, are handed to the workers before the rest (the Makefile passes --no-loadscope-reorder, so xdist keeps this
# order): with whole files as the units of work (--dist loadfile), a long file started last keeps one worker busy
# while the other waits. Files not named keep their collection order; a renamed file only loses its place.
SLOW_FILES = (
    "test_search_train.py", "test_search_differentiable.py", "test_benchmark_lm.py", "test_benchmark_differentiable.py",
    "test_search_hardening.py", "test_readme.py", "test_search_differentiable_macro.py", "test_notebooks.py",
    "test_tg_errors.py", "test_strategies.py", "test_search_distributed.py", "test_search_table.py",
    "test_search_lm.py", "test_population_sized_train.py", "test_tg_models.py", "test_export_onnx.py",
    "test_population_lm_sized.py", "test_benchmark_ranking.py", "test_benchmark_population.py",
    "test_search_halving.py", "test_seqgate.py", "test_population_sized.py", "test_supernet_conv.py",
    "test_benchmark_adaptive.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay in order
