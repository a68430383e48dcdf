"""The Colab notebooks of notebooks/, executed on CPU and offline with tiny parameters.

Each notebook is run by nbclient in a python3 kernel of this interpreter, with cwd a temporary folder; the
tiny parameters go into a cell inserted right after the notebook's "parameters" cell (as papermill injects
them). The kernel inherits conftest.py's environment: offline hubs, CPU JAX with 4 host devices, a private
cache. The committed files themselves must carry no outputs.
"""

import ast
import sys
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart_gpu.ipynb", "tpu_population.ipynb", "seqgate_distilgpt2.ipynb")

# Mode train over small MLPs on the 8x8 digits: the whole search, retraining and export in well under a minute.
QUICKSTART = dict(
    CONFIG=str(ROOT / "configs" / "quick.yaml"),
    OVERRIDES=[
        "data.name=digits", "mode=train", "space.families=[mlp]", "space.units=[16,32]", "space.max_stages=2",
        "space.max_depth=1", "space.dropouts=[0.0]", "search.population=4", "search.budget=8", "train.epochs=2",
        "train.learning_rate=0.01", "final.top_k=1", "final.epochs=2", "final.seeds=1", "final.control=0", "final.baselines=[]", "progress=false",
    ],
    OUTPUT="runs/quickstart",
    SHOW_IMAGES=4,
)
# P = 6 on 4 devices: the sharded arm is padded to 8.
TPU = dict(
    DATASET="digits",
    SPACE=["space.families=[mlp]", "space.units=[16,32]", "space.max_stages=2", "space.max_depth=1"],
    POPULATION=6,
    EPOCHS=1,
    BATCH_SIZE=64,
    LEARNING_RATE=0.01,
    REPEATS=3,  # the fewest that still alternate the arms' order (forward, reversed, forward)
)
# The smallest end-to-end SeqGate sizes of tests/test_seqgate.py, plus one further frontier guardrail.
SEQGATE = dict(
    MODEL="smollm2-135m", TEXT="pydoc", DEVICE="cpu", FRONTIER=[0.05], MAX_TOKENS=96, WINDOW=64, PROBE_TOKENS=16,
    CALIBRATION_WINDOWS=1, REPEATS=5, TIMING_WINDOWS=1, DECODE_PROMPT=32, DECODE_TOKENS=2, THREADS=1,
    PROGRESS=False,
)


def _load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / name, as_version=4)


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _parameter_names(cell) -> set[str]:
    return {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}


def execute(name: str, parameters: dict, cwd: Path) -> nbformat.NotebookNode:
    """The notebook executed with ``parameters`` injected after its parameters cell (cwd ``cwd``)."""
    nb = _load(name)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    unknown = set(parameters) - _parameter_names(nb.cells[index])
    assert not unknown, f"{name} has no parameters {sorted(unknown)}"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    kernel_check = nbformat.v4.new_code_cell(f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.executable")
    nb.cells[index + 1 : index + 1] = [injected, kernel_check]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _printed(nb) -> str:
    return "".join(o.get("text", "") for c in _code_cells(nb) for o in c.outputs if o.output_type == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    nb = _load(name)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped:\n{cell.source}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_with_parameters_then_a_colab_only_install_cell(name):
    parameters, install = _code_cells(_load(name))[:2]
    assert parameters.metadata.get("tags") == ["parameters"]
    assert "REPO_URL" in _parameter_names(parameters)
    assert '"google.colab" in sys.modules' in install.source and "%pip install" in install.source
    # Everything that touches the network (pip, git) sits inside `if IN_COLAB:`, so the tests never run it.
    tree = ast.parse(TransformerManager().transform_cell(install.source))
    guarded = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "IN_COLAB"]
    assert len(guarded) == 1
    inside = ast.unparse(ast.Module(body=guarded[0].body, type_ignores=[]))
    outside = ast.unparse(ast.Module(body=[n for n in tree.body if n is not guarded[0]], type_ignores=[]))
    assert "run_line_magic('pip'" in inside and "REPO_URL" in inside
    assert "pip" not in outside and "git" not in outside and "subprocess.run" not in outside


def test_quickstart_notebook_searches_reports_and_reloads_the_best_model(tmp_path):
    nb = execute("quickstart_gpu.ipynb", QUICKSTART, tmp_path)
    printed = _printed(nb)
    assert "not on Colab" in printed
    run = tmp_path / "runs" / "quickstart"
    assert (run / "report.html").is_file() and (run / "model" / "arch.json").is_file()
    assert "recomputed" in printed and "in best.json" in printed
    shown = [o for c in _code_cells(nb) for o in c.outputs if "text/html" in o.get("data", {})]
    assert any("<iframe srcdoc=" in o["data"]["text/html"] for o in shown)


def test_tpu_notebook_shards_the_population_over_every_device_with_equal_results(tmp_path):
    nb = execute("tpu_population.ipynb", TPU, tmp_path)
    printed = _printed(nb)
    assert "not on Colab" in printed
    assert "4 devices" in printed and "padded to a multiple of 4" in printed
    assert "speed-up of 4 devices over one" in printed
    assert "sharded over 4 devices: parameters, validation accuracies and statuses of all 6 candidates" in printed


def test_seqgate_notebook_reports_the_frontier_table_and_plot(tmp_path):
    nb = execute("seqgate_distilgpt2.ipynb", SEQGATE, tmp_path)
    printed = _printed(nb)
    assert "not on Colab" in printed
    assert (tmp_path / "seqgate" / "report.json").is_file() and (tmp_path / "seqgate" / "frontier.png").is_file()
    assert "smollm2-135m (30 layers) on pydoc" in printed
    images = [o for c in _code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the frontier plot was not shown"
