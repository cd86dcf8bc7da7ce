"""Storage anywhere: `visor_jax.paths` on local paths and on a fake gs:// bucket, confinement
under gs:// roots, and a tiny training run whose workdir is gs://bucket/... end to end.

The fake bucket is `gcp-storage-emulator` (in memory, on 127.0.0.1, in this process): gcsfs
(epath's gs:// backend without TensorFlow) reaches it through `STORAGE_EMULATOR_HOST`, and
tensorstore (Orbax's array writer, its own GCS driver) through `TENSORSTORE_GCS_HTTP_URL`
with `GOOGLE_AUTH_TOKEN_FOR_TESTING` as its bearer token. Nothing leaves the machine.
docs/storage.md says what this covers.
"""
import io
import json
import logging
import os
import uuid

import numpy as np
import PIL.Image
import pytest

import hf_fixtures
import train_fixtures as tf
from visor_jax import paths

BUCKET = "visor-test-bucket"


def _send_generation_on_download():
  """Makes the emulator's media downloads carry `x-goog-generation`, as GCS's do: tensorstore
  reads an object's generation from that header (without it: "Malformed StorageGeneration"
  as soon as Orbax's OCDBT manifest is read back during a save)."""
  from gcp_storage_emulator import exceptions, server
  from gcp_storage_emulator.handlers import objects
  original = objects.download
  if getattr(original, "sends_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
    except exceptions.NotFound:
      pass  # the original answers 404
    return original(request, response, storage, *args, **kwargs)

  download.sends_generation = True
  objects.download = download  # `objects.get` answers `?alt=media` through it
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


@pytest.fixture(scope="session")
def bucket():
  """gs://<BUCKET> served from memory on 127.0.0.1 for the whole session; the environment
  variables that point gcsfs and tensorstore at it are restored afterwards."""
  from gcp_storage_emulator.server import create_server
  _send_generation_on_download()
  server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
  server.start()
  httpd = server._api._httpd  # pylint: disable=protected-access
  httpd.handle_error = lambda *_: None  # clients hanging up mid-response: not our errors
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are expected
  url = f"http://127.0.0.1:{httpd.server_address[1]}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
         # gcsfs's bucket-layout probe (a gRPC call the emulator does not serve)
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  # Anonymous: no credential lookup (google.auth would probe the GCE metadata server).
  saved_conf = fsspec.config.conf.get("gs")
  fsspec.config.conf["gs"] = {**(saved_conf or {}), "token": "anon"}
  fsspec.get_filesystem_class("gs").clear_instance_cache()  # no instance pointing elsewhere
  yield f"gs://{BUCKET}"
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  if saved_conf is None:
    fsspec.config.conf.pop("gs", None)
  else:
    fsspec.config.conf["gs"] = saved_conf
  fsspec.get_filesystem_class("gs").clear_instance_cache()
  server.stop()


@pytest.fixture
def remote(bucket):
  """A fresh prefix in the fake bucket, one per test."""
  return f"{bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """The same checks against a local directory and the fake bucket."""
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("remote")


def png(seed=0) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(hf_fixtures.random_image(20, 30, seed)).save(buf, "PNG")
  return buf.getvalue()


# ----------------------------------------------------------------------------- the path layer


def test_read_write_list_exists_makedirs(root):
  d = paths.join(root, "a", "b")
  assert not paths.exists(d)
  paths.makedirs(d)
  paths.makedirs(d)  # exist_ok
  assert paths.listdir(d) == []  # on a bucket: an empty prefix, which lists (as [])
  paths.write_text(paths.join(d, "x.txt"), "héllo\n")
  with paths.open(paths.join(d, "y.bin"), "wb") as f:
    f.write(b"\x00\x01")
  assert paths.read_text(paths.join(d, "x.txt")) == "héllo\n"
  assert paths.read_bytes(paths.join(d, "y.bin")) == b"\x00\x01"
  assert sorted(paths.listdir(d)) == ["x.txt", "y.bin"]
  assert paths.listdir(paths.join(root, "a")) == ["b"]
  assert paths.isdir(d) and not paths.isfile(d)
  assert paths.isfile(paths.join(d, "x.txt")) and not paths.isdir(paths.join(d, "x.txt"))
  assert not paths.exists(paths.join(d, "nope.txt"))
  paths.atomic_write(paths.join(d, "x.txt"), "replaced")
  assert paths.read_text(paths.join(d, "x.txt")) == "replaced"
  assert sorted(paths.listdir(d)) == ["x.txt", "y.bin"]  # no temporary file left behind
  paths.remove(paths.join(d, "y.bin"))
  assert paths.listdir(d) == ["x.txt"]
  copy = paths.join(root, "copy")
  paths.copytree(paths.join(root, "a"), copy)
  assert paths.read_text(paths.join(copy, "b", "x.txt")) == "replaced"


def test_copy_between_local_and_bucket(tmp_path, remote):
  (tmp_path / "src" / "sub").mkdir(parents=True)
  (tmp_path / "src" / "sub" / "f.txt").write_text("up")
  paths.copytree(str(tmp_path / "src"), remote)
  paths.copytree(remote, str(tmp_path / "back"))
  assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "up"


def test_url_names_and_local_paths_as_before(tmp_path):
  assert paths.is_remote("gs://b/run") and not paths.is_remote(str(tmp_path))
  assert paths.normalize("gs://b/run/./x/../ckpt/") == "gs://b/run/ckpt"
  assert paths.normalize("gs://b/../../x") == "gs://b/x"  # never above the bucket
  assert paths.normalize("rel/dir") == os.path.abspath("rel/dir")
  assert paths.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
  assert paths.dirname("gs://b/run/checkpoints") == "gs://b/run"
  assert paths.dirname("gs://b") == "gs://b"
  assert paths.basename("gs://b/run/4/") == "4"
  with pytest.raises(ValueError, match="append"):
    paths.open("gs://b/x.jsonl", "a")


# ----------------------------------------------------------------------------- confinement


@pytest.mark.parametrize("hostile", [
    "../secret.png", "imgs/../../secret.png", "../root2/ok.png", "/etc/passwd",
    "gs://other-bucket/x.png", "imgs/ok\x00.png", "../" * 12 + "etc/passwd"])
def test_confinement_under_a_gs_root_refuses(hostile):
  with pytest.raises(paths.Unconfined):
    paths.confine("gs://b/data/root", hostile)


def test_confinement_under_a_gs_root_resolves_dots():
  assert paths.confine("gs://b/data/root/", "imgs/../imgs/./ok.png") == \
      "gs://b/data/root/imgs/ok.png"


def test_image_loader_and_json_source_read_from_the_bucket(remote):
  """A LLaVA JSONL corpus in the bucket: records by ranged reads, images confined to the
  root (a sibling prefix sharing the root's name is outside it), bad refs counted."""
  from visor_jax.data import conversations as conv
  root = paths.join(remote, "root")
  with paths.open(paths.join(root, "imgs", "ok.png"), "wb") as f:
    f.write(png(1))
  with paths.open(paths.join(remote, "root2", "ok.png"), "wb") as f:
    f.write(png(2))
  refs = ["imgs/ok.png", "imgs/../imgs/ok.png", "../root2/ok.png", "imgs/missing.png"]
  paths.write_text(paths.join(root, "data.jsonl"),
                   "".join(json.dumps({"id": i, "image": r}) + "\n" for i, r in enumerate(refs)))
  source = conv.JsonSource(paths.join(root, "data.jsonl"))
  assert source.image_root == root and len(source) == 4
  assert [source[i]["image"] for i in range(4)] == refs
  loader = conv.ImageLoader(source.image_root)
  assert np.asarray(loader(refs[0])).shape == (20, 30, 3)
  assert np.array_equal(np.asarray(loader(refs[1])), np.asarray(loader(refs[0])))
  for ref, reason in ((refs[2], "unsafe_path"), (refs[3], "missing_image")):
    with pytest.raises(conv.BadSample) as e:
      loader(ref)
    assert e.value.reason == reason


def test_safetensors_in_the_bucket_and_shard_names_stay_inside(remote):
  from visor_jax.convert import safetensors_io
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int32)}
  safetensors_io.save_file(tensors, paths.join(remote, "model.safetensors"))
  reader = safetensors_io.SafetensorsReader(remote)
  assert sorted(reader.keys()) == ["a", "b"]
  np.testing.assert_array_equal(reader.get("a"), tensors["a"])
  np.testing.assert_array_equal(reader.get("b"), tensors["b"])
  evil = paths.join(remote, "evil")
  paths.write_text(paths.join(evil, safetensors_io.INDEX_FILE),
                   json.dumps({"weight_map": {"a": "../model.safetensors"}}))
  with pytest.raises(ValueError, match="outside the checkpoint directory"):
    safetensors_io.SafetensorsReader(evil)


# ----------------------------------------------------------------------------- run outputs


def test_metrics_in_the_bucket_drop_redone_rows_and_keep_tensorboard_attempts(remote):
  from visor_jax.training import metrics
  w = metrics.Writer(remote)
  for step in (1, 2, 3):
    w.write(step, {"loss": float(step)})
  w.close()
  rows = [json.loads(x) for x in paths.read_text(paths.join(remote, "metrics.jsonl")).splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  w = metrics.Writer(remote, start_step=2)  # a resume from step 2 redoes step 3
  w.write(3, {"loss": 30.0})
  w.close()
  rows = [json.loads(x) for x in paths.read_text(paths.join(remote, "metrics.jsonl")).splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  events = paths.listdir(paths.join(remote, "tensorboard"))
  assert len(events) == 2 and all("tfevents" in e for e in events)
  assert all(paths.read_bytes(paths.join(remote, "tensorboard", e)) for e in events)


def test_evaluation_outputs_in_the_bucket(remote):
  """What the end-of-run evaluation and the search write: JSON, the Pareto PNG, feasible.json
  (and reading it back as a budget spec), the report's results.md."""
  from visor_jax import budgets
  from visor_jax.evaluation import harness, report
  out = paths.join(remote, "eval")
  harness.write_json({"x": float("nan")}, paths.join(out, "summary.json"))
  assert json.loads(paths.read_text(paths.join(out, "summary.json"))) == {"x": None}
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  harness.save_figure(plt.figure(), paths.join(out, "pareto.png"))
  assert paths.read_bytes(paths.join(out, "pareto.png")).startswith(b"\x89PNG")
  budgets.write_feasible(paths.join(out, "feasible.json"), [[4], [1, 4]])
  assert budgets.read_feasible(paths.join(out, "feasible.json")) == [[4], [1, 4]]
  hard = {"acc": 0.5, "lo": 0.3, "hi": 0.7, "n": 20}
  results = {"title": "t", "families": {"fine": {"kind": "fine", "chance": 0.1}},
             "rows": [{"method": "base", "setting": "all", "llm_gflops": 1.0, "llm_saving": 1.0,
                       "total_saving": 1.0, "families": {"fine": hard, "hard": hard}}]}
  written = report.write(results, paths.join(remote, "results"))
  assert paths.read_text(written["md"]) == report.markdown(results)
  assert paths.read_bytes(written["plot"]).startswith(b"\x89PNG")
  assert report.read(paths.join(remote, "results"))["title"] == "t"


def test_embedded_data_of_a_gs_run_is_built_locally():
  import ml_collections
  from visor_jax.data import sources
  data = ml_collections.ConfigDict(dict(source="synthetic", synthetic_dir=""))
  assert sources.synthetic_dir(data, "gs://b/run") == sources.LOCAL_DATA_CACHE
  assert sources.synthetic_dir(data, "/tmp/run") == "/tmp/run/synthetic_data"
  data.synthetic_dir = "gs://b/data"
  with pytest.raises(ValueError, match="local directory"):
    sources.check_paths(data)


@pytest.mark.slow
def test_training_run_in_the_bucket_resumes_and_is_an_init_from(
    bucket, synthetic_dir, tmp_path, monkeypatch, caplog):
  """workdir=gs://...: checkpoints, metrics.jsonl and TensorBoard land in the bucket
  (no local `gs:` directory); a rerun resumes from the bucket's checkpoint; `runs.load_run`
  reads it, `export` writes it back into the bucket (and that loads, bit for bit); another
  run starts from it (`init_from`)."""
  import jax
  from flax import traverse_util
  from visor_jax import runs
  from visor_jax.training import train
  monkeypatch.chdir(tmp_path)  # a stray relative `gs:/...` directory would land here
  workdir = f"{bucket}/run-{uuid.uuid4().hex[:8]}"
  # No end-of-run evaluation (its outputs go through the same writers as
  # test_evaluation_outputs_in_the_bucket's): the test stays under a minute.
  first = train.main(tf.tiny_config(synthetic_dir, num_steps=2, ckpt_every=2, **tf.NO_EVAL),
                     workdir)
  assert int(first.state["step"]) == 2
  assert "2" in paths.listdir(paths.join(workdir, "checkpoints"))
  assert paths.isfile(paths.join(workdir, "metrics.jsonl"))
  assert any("tfevents" in f for f in paths.listdir(paths.join(workdir, "tensorboard")))
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists("gs:")

  caplog.set_level(logging.INFO, logger="visor_jax.checkpoints")
  second = train.main(tf.tiny_config(synthetic_dir, num_steps=3, ckpt_every=3, **tf.NO_EVAL),
                      workdir)
  assert int(second.state["step"]) == 3
  assert f"restored step 2 from {workdir}/checkpoints" in caplog.text
  assert {"2", "3"} <= set(paths.listdir(paths.join(workdir, "checkpoints")))
  rows = [json.loads(x) for x in paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines()]
  assert sorted(r["step"] for r in rows if "budget" in r) == [1, 2, 3]
  assert len(paths.listdir(paths.join(workdir, "tensorboard"))) == 2

  loaded = runs.load_run(workdir)
  assert loaded.kind == "orbax" and loaded.step == 3 and loaded.workdir == workdir
  # Exported into the bucket and read back: config.json, tokenizer, preprocessor config and
  # safetensors (ranged reads), the path a gs:// transformers `init_from` takes.
  from visor_jax import export
  exported = workdir + "-export"
  export.export(workdir, exported)
  back = runs.load_run(exported)
  assert back.kind == "export" and back.image_spec == loaded.image_spec
  assert back.tokenizer.files == loaded.tokenizer.files
  flat = lambda p: traverse_util.flatten_dict(jax.device_get(p), sep=".")
  got, want = flat(back.params), flat(loaded.params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  started = train.main(tf.tiny_config(synthetic_dir, num_steps=0, init_from=workdir,
                                      **tf.NO_EVAL), str(tmp_path / "from_bucket"))
  got, want = flat(started.state["params"]), flat(second.state["params"])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert not os.path.exists("gs:")
