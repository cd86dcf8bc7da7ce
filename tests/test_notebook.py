"""The Colab notebook (notebooks/visor_colab.ipynb) runs headless, end to end, at tiny scale.

Its `parameters` cell is replaced by TINY (no install, the tiny model, 3 steps, a few items);
nbclient runs every cell in a kernel on this venv's python (a kernelspec written to a temp
JUPYTER_PATH, so no user-installed "python3" kernel is picked up), with one CPU device and the
suite's compilation cache. Then the outputs must show what the notebook promises: the
backend, the training table, one budget and one answer per question with the images, and the
Pareto plot the evaluation wrote.
"""
import ast
import base64
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "visor_colab.ipynb")
KERNEL = "visor-test"
TINY = dict(INSTALL=False, REPO_URL="unused", REPO_DIR="unused", MODEL="tiny", TRAIN_STEPS=3,
            BATCH=4, TRAIN_IMAGES=32, VAL_IMAGES=8, MIN_SIDE=256, MAX_SIDE=384, EVAL_ITEMS=4,
            MAX_NEW_TOKENS=4, ROUTER_SAMPLES=8, ROUTER_EPOCHS=2, SHOW_ITEMS=2, THRESHOLD=0.5)
BUDGET = r"(CA-only|SA\{[\d,]+\})"


def parameters_cell(nb):
  [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  return cell


def assigned_names(source: str) -> set[str]:
  names = set()
  for node in ast.parse(source).body:
    for target in getattr(node, "targets", []):
      elts = target.elts if isinstance(target, ast.Tuple) else [target]
      names |= {e.id for e in elts}
  return names


def write_kernelspec(jupyter_path: str) -> None:
  """A kernel on this interpreter; one CPU device (the suite's 8 fake ones are for mesh tests)
  and fast compiles, as train_fixtures.env() gives subprocess runs."""
  from conftest import FAST_COMPILE
  spec_dir = os.path.join(jupyter_path, "kernels", KERNEL)
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "visor_jax tests", "language": "python",
               "env": {"XLA_FLAGS": FAST_COMPILE, "PYTHONPATH": ROOT,
                       "IPYTHONDIR": os.path.join(jupyter_path, "ipython")}}, f)


def stream_text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def pngs(cell) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for o in cell.outputs
          if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def test_parameters_cell_is_plain_assignments():
  """CI replaces the cell wholesale: TINY must set every knob the notebook has."""
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  source = parameters_cell(nb).source
  assert assigned_names(source) == set(TINY) | {"WORKDIR"}
  namespace = {}
  exec(source, namespace)  # literals only: runs without imports
  assert namespace["INSTALL"] is True and namespace["MODEL"] == "small"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = str(tmp_path / "runs")
  parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in
                                         {**TINY, "WORKDIR": workdir}.items())
  jupyter_path = str(tmp_path / "jupyter")
  write_kernelspec(jupyter_path)
  monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", os.path.join(jupyter_path, "runtime"))
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                          resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

  code = [c for c in nb.cells if c.cell_type == "code"]
  by_text = lambda s: [c for c in code if s in c.source]
  [backend] = by_text("jax.default_backend()")
  assert "backend: cpu" in stream_text(backend)
  [train] = by_text("configs/universal.py")
  assert re.search(r"^CA-only\s+\d\.\d\d", stream_text(train), re.M), stream_text(train)
  assert os.path.isdir(os.path.join(workdir, "universal", "checkpoints", "3"))
  [router] = by_text("configs/router.py")
  assert "pseudo-labels per budget:" in stream_text(router)

  [answers] = by_text("assistant.answer(")
  text = stream_text(answers)
  n = TINY["SHOW_ITEMS"]
  assert len(re.findall(r"^Q\d+: \S", text, re.M)) == n, text
  assert len(re.findall(rf"^  budget: {BUDGET} \(\d+\.\d+ LLM GFLOPs\)$", text, re.M)) == n, text
  assert len(re.findall(r"^  answer: '.*'  \(expected '.+'\)$", text, re.M)) == n, text
  [figure] = pngs(answers)
  assert figure.startswith(b"\x89PNG")

  [pareto] = by_text("pareto.png")
  assert re.search(r"^router\s+\d\.\d\d", stream_text(pareto), re.M), stream_text(pareto)
  with open(os.path.join(workdir, "eval", "pareto.png"), "rb") as f:
    assert pngs(pareto) == [f.read()]
