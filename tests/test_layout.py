"""The package's layers, and that imports run one way: downwards.

  6  entry points   main, export, benchmarks/, reproduce
  5  training/      the trainer, its config, steps, optimizer, metrics, router training
  4  evaluation/    harness, metrics, entry point
  3  inference/     generation, serving
  2  runs           load_run: one way to load any run
  1  components     models/, data/, convert/, flops
  0  foundation     config_lib, model_configs, budgets, sharding, checkpoints, paths,
                    distributed

A module may import its own layer and the ones below, never above (function-level imports
included), so a newcomer can read the tree bottom-up and training never leaks into serving.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "visor_jax"
LAYERS = {
    "config_lib": 0, "model_configs": 0, "budgets": 0, "sharding": 0, "checkpoints": 0,
    "paths": 0, "distributed": 0,
    "models": 1, "data": 1, "convert": 1, "flops": 1,
    "runs": 2, "inference": 3, "evaluation": 4, "training": 5,
    "main": 6, "export": 6, "benchmarks": 6, "reproduce": 6,
}


def layer_of(module: str) -> int | None:
  """'visor_jax.data.pipeline' → 1; the package itself → None."""
  parts = module.split(".")
  return LAYERS[parts[1]] if len(parts) > 1 else None


def imports(path: pathlib.Path) -> set[str]:
  """Every visor_jax module `path` imports (`from visor_jax import x` → visor_jax.x)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("visor_jax")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visor_jax"):
      base = node.module
      out |= {f"{base}.{a.name}" if base == "visor_jax" else base for a in node.names}
  return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_has_a_layer():
  for path in MODULES:
    top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert top in LAYERS, f"{path}: add {top!r} to LAYERS (and to the README's layout)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
  own = LAYERS[path.relative_to(PACKAGE).parts[0].removesuffix(".py")]
  upward = sorted(m for m in imports(path) if (layer_of(m) or 0) > own)
  assert not upward, f"{path.name} (layer {own}) imports upward: {upward}"


def test_the_old_flat_modules_are_gone():
  """The training / evaluation / inference split replaced these top-level modules."""
  for name in ("train", "train_data", "train_config", "steps", "optim", "metrics", "generate",
               "serving", "evaluate", "eval_main", "eval_metrics", "evaluation_table",
               "router_train"):
    assert not (PACKAGE / f"{name}.py").exists(), name
