"""The installable package (pyproject.toml): it builds offline, the installed copy imports and
finds its configs from any directory, and its console scripts start.

Each install is built from a copy of the sources in a temp directory (setuptools writes build/
and *.egg-info next to the sources; the checkout stays clean), without network or build
isolation, with this venv's setuptools (pinned in requirements.txt). Every command then runs
from an unrelated temp directory, with only the installed copy on the path: no configs/ there,
and the checkout is not importable.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "visor_jax", "configs")

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
  PYPROJECT = tomllib.load(_f)

# Run in the installed copy: loads configs by the paths the README uses (a `:variant` and a
# `--config.x=y` override on the universal config; the router config with a separate value;
# the reproduce config as `visor-reproduce`'s default) and prints what it found.
CHECK = r"""
import json
from absl import flags
from ml_collections import config_flags
import visor_jax
from visor_jax import config_lib, main, model_configs

argv = main.resolve_config_flag(["visor-train", "--config=configs/universal.py:model=tiny,steps=7",
                                 "--config.log_every=3", "--workdir=w"])
fv = flags.FlagValues()
main.define_flags(fv, argv)
fv(argv)
router_argv = main.resolve_config_flag(["visor-train", "--config", "configs/router.py"])
fv_router = flags.FlagValues()
main.define_flags(fv_router, router_argv)
fv_router(router_argv)
repro_argv = main.resolve_config_flag(["visor-reproduce"], "configs/reproduce.py")
fv_repro = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, flag_values=fv_repro, sys_argv=repro_argv)
fv_repro(repro_argv)
print(json.dumps(dict(
    package=visor_jax.__file__, universal=argv[1], num_steps=fv.config.num_steps,
    log_every=fv.config.log_every,
    tiny=fv.config.model.to_dict() == model_configs.tiny().to_dict(),
    router=router_argv[2], has_router_train="router_train" in fv_router.config,
    reproduce=repro_argv[1], reproduce_scale=fv_repro.config.scale,
    default=fv["config"].default_as_str,
    as_typed=config_lib.resolve_config_path("elsewhere/x.py:a=1"))))
"""


def _copy_sources(dst: str) -> str:
  os.makedirs(dst)
  for name in SOURCES:
    src = os.path.join(ROOT, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dst, name),
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(src, dst)
  return dst


def _pip_install(*args: str) -> None:
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", *args]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(extra)
  return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """`pip install .` into a target directory: (site dir, scripts dir, an unrelated cwd)."""
  tmp = tmp_path_factory.mktemp("package")
  site = str(tmp / "site")
  _pip_install("--target", site, _copy_sources(str(tmp / "src")))
  cwd = tmp / "elsewhere"
  cwd.mkdir()
  return site, os.path.join(site, "bin"), str(cwd)


def _check(site: str, cwd: str, **env) -> dict:
  p = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env=_env(**env),
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_installed_copy_imports_and_finds_its_configs(installed):
  site, _, cwd = installed
  out = _check(site, cwd, PYTHONPATH=site)
  configs = os.path.join(site, "visor_jax", "configs")
  assert out["package"] == os.path.join(site, "visor_jax", "__init__.py")
  assert out["universal"] == f"--config={configs}/universal.py:model=tiny,steps=7"
  assert (out["num_steps"], out["log_every"], out["tiny"]) == (7, 3, True)
  assert out["router"] == f"{configs}/router.py" and out["has_router_train"]
  assert out["reproduce"] == f"--config={configs}/reproduce.py"
  assert out["reproduce_scale"] == "full"
  assert out["default"] == f"'{configs}/universal.py'"   # visor-train with no --config
  assert out["as_typed"] == "elsewhere/x.py:a=1"         # not a configs/ path: untouched


def test_installed_copy_has_every_module_and_config(installed):
  site = installed[0]

  def py_files(top: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top)
            for f in fs if f.endswith(".py")}
  assert py_files(os.path.join(site, "visor_jax")) == (
      py_files(os.path.join(ROOT, "visor_jax"))
      | {os.path.join("configs", f) for f in py_files(os.path.join(ROOT, "configs"))})


def test_console_scripts_start(installed):
  site, bin_dir, cwd = installed
  assert sorted(os.listdir(bin_dir)) == sorted(PYPROJECT["project"]["scripts"])
  env = _env(PYTHONPATH=site)
  for script, module_file, flag in [("visor-train", "main.py", "--workdir"),
                                    ("visor-export", "export.py", "--checkpoint"),
                                    ("visor-flops", "flops.py", "--image_size")]:
    p = subprocess.run([sys.executable, os.path.join(bin_dir, script), "--help"], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=120)
    # absl's --help prints the command's own flags, then exits with status 1.
    assert p.returncode == 1, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert os.path.join(site, "visor_jax", module_file) + ":" in out, out[-2000:]
    assert flag in out and "Traceback" not in out, out[-2000:]


def test_editable_install_finds_the_checkout(tmp_path):
  """`pip install -e .`: the package and configs/ come from the (copied) checkout."""
  src = _copy_sources(str(tmp_path / "checkout"))
  prefix = str(tmp_path / "prefix")
  _pip_install("--prefix", prefix, "-e", src)
  site = os.path.join(prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                      "site-packages")
  assert any(f.endswith(".pth") for f in os.listdir(site))
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  # The editable finder is registered by a .pth file: only site directories process those.
  # It goes first, ahead of an editable install of the checkout itself in this venv, if any.
  add_site = (f"import site, sys; before = list(sys.meta_path); site.addsitedir({site!r}); "
              "sys.meta_path[:] = [f for f in sys.meta_path if f not in before] + before\n")
  p = subprocess.run([sys.executable, "-c", add_site + CHECK],
                     cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["package"] == os.path.join(src, "visor_jax", "__init__.py")
  assert out["universal"] == f"--config={src}/configs/universal.py:model=tiny,steps=7"
  assert (out["num_steps"], out["tiny"]) == (7, True)


def _name(requirement: str) -> str:
  return re.split(r"[\s=<>!~\[;#]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_lists_every_requirement_with_its_pin():
  """requirements.txt (what CI installs) and pyproject.toml do not drift apart: each
  requirement is a dependency or in an extra, with the same pin where pyproject pins it."""
  listed = {}
  project = PYPROJECT["project"]
  for req in project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                        for r in extra]:
    listed[_name(req)] = req.replace(" ", "")
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    required = [line.split("#")[0].strip() for line in f]
  missing, different = [], []
  for req in filter(None, required):
    name = _name(req)
    if name not in listed:
      missing.append(req)
    elif "==" in listed[name] and listed[name] != req.replace(" ", ""):
      different.append((req, listed[name]))
  assert not missing, f"requirements.txt entries missing from pyproject.toml: {missing}"
  assert not different, f"pins differ (requirements.txt, pyproject.toml): {different}"
  assert "gcp" in project["optional-dependencies"]
