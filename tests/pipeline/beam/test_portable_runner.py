"""The preprocessing job on a distributed runner's terms: Beam's portable runner, and no local disk.

* Portable runner: the job is submitted with ``--runner=PortableRunner`` over the Runner API to a Beam job service
  in its own process (``python -m pipeline.beam.runner``: Beam's ``LocalJobServicer`` honouring
  ``--direct_num_workers``) and runs in SDK harnesses that an external worker pool
  (``apache_beam.runners.worker.worker_pool_main``) starts as separate processes: the submission and harness
  that Flink, Spark and Dataflow workers use. Vocabularies, bucket boundaries, row counts, the dead letter, the
  per-user state and every split's transformed rows must equal the DirectRunner's, and two harness processes of
  one job must have read the input files.
* No local disk: the DirectRunner reference run has its input and output on TensorFlow's in-process ``ram://``
  filesystem only, while open(), os.path, os.makedirs, glob... raise on such paths: everything the stage reads or
  writes goes through Beam's FileSystems or tf.io.gfile, as workers sharing no disk need.

The data is built-in data (per-user features on) plus a file of five bad rows.
"""
import collections
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import CompressedFile, CompressionTypes, FileMetadata, FileSystem

REPO = str(Path(__file__).resolve().parents[3])
BAD_FILE = "part-00099.parquet"
ROWS = 1000  # 4 files of 250 rows
# sitecustomize for the worker pool and the harnesses it starts: every Python-level open() of a path under
# RANKLINE_PROBE_DIR is logged with the opening process's id (an audit hook; no pipeline code involved).
_PROBE = textwrap.dedent("""
    import os, re, sys
    _dir, _log = os.environ.get("RANKLINE_PROBE_DIR"), os.environ.get("RANKLINE_PROBE_LOG")
    if _dir and _log:
        with open("/proc/self/cmdline", "rb") as fh:  # a harness: ... SdkHarness("<control endpoint>", ...)
            _job = (re.findall(r'SdkHarness\\("([^"]+)"', fh.read().decode(errors="replace")) or ["-"])[0]
        def _hook(event, args):
            if event == "open" and args and isinstance(args[0], str) and args[0].startswith(_dir):
                fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, ("%d %s %s\\n" % (os.getpid(), _job, args[0])).encode())
                os.close(fd)
        sys.addaudithook(_hook)
""")
# The driver of the portable run (its own process, so the test can bound its time).
_DRIVER = textwrap.dedent("""
    import os, sys
    from dataclasses import replace
    from pipeline.beam.preprocess import PreprocessConfig, run_preprocess
    from transforms.preprocessing import build_preprocessing_fn
    from transforms.schema import builtin_schema_path, load_schema
    data, out = sys.argv[1], sys.argv[2]
    schema = load_schema(builtin_schema_path("builtin"), input_path=os.path.join(data, "part-*.parquet"))
    schema = replace(schema, split=replace(schema.split, eval_fraction=0.2, test_fraction=0.1))
    run_preprocess(schema, PreprocessConfig(output_dir=out), build_preprocessing_fn(schema.contract), sys.argv[3:])
""")


def _schema(data):
    from transforms.schema import builtin_schema_path, load_schema

    schema = load_schema(builtin_schema_path("builtin"), input_path=os.path.join(data, "part-*.parquet"))
    return replace(schema, split=replace(schema.split, eval_fraction=0.2, test_fraction=0.1))


def _write_data(data: str) -> None:
    """Built-in data (4 files of ROWS / 4 rows) and ``BAD_FILE``: 5 copies of real rows, each broken one way."""
    from pipeline import datagen

    datagen.write_parquet(datagen.GeneratorConfig(rows=ROWS, seed=3, rows_per_file=ROWS // 4), data, progress=False)
    good = pq.read_table(os.path.join(data, "part-00000.parquet")).slice(0, 5)
    rows = good.to_pylist()
    rows[0]["click"] = 2                              # label outside {0, 1}
    rows[1]["click"], rows[1]["purchase"] = 0, 1      # purchase without click
    rows[2]["timestamp"] = None                       # missing timestamp
    rows[3]["item_price"] = float("inf")              # non-finite feature
    rows[4]["staytime"] = None                        # missing continuous label
    pq.write_table(pa.Table.from_pylist(rows, schema=good.schema), os.path.join(data, BAD_FILE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, port: int, what: str, log: str, timeout: float = 90.0) -> None:
    import grpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {Path(log).read_text()[-2000:]}")
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=2)
                return
            except grpc.FutureTimeoutError:
                pass
    raise TimeoutError(f"{what} not serving on port {port} after {timeout:.0f}s: {Path(log).read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Kills the process group ``proc`` leads (the pool's harnesses included); waits for ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def portable_services(tmp_path, direct_run):
    """A job service and a worker pool on free ports; every process they start is killed afterwards."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(_PROBE)
    env = dict(os.environ, PYTHONPATH=REPO, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    pool_env = dict(env, PYTHONPATH=f"{probe}{os.pathsep}{REPO}", RANKLINE_PROBE_DIR=direct_run["data"] + os.sep,
                    RANKLINE_PROBE_LOG=str(tmp_path / "opened.log"))
    job_port, pool_port = _free_port(), _free_port()
    procs = []
    try:
        for what, cmd, penv in [
                ("job service", [sys.executable, "-m", "pipeline.beam.runner", "--port", str(job_port)], env),
                ("worker pool", [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                                 "--service_port", str(pool_port)], pool_env)]:
            log = str(tmp_path / f"{what.replace(' ', '_')}.log")
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            _wait_ready(procs[-1], job_port if what == "job service" else pool_port, what, log)
        yield {"job_port": job_port, "pool_port": pool_port, "env": env, "opened": tmp_path / "opened.log",
               "pids": {p.pid for p in procs}}
    finally:
        for proc in procs:
            _stop(proc)


def _rows(record: bytes):
    """The transformed rows in one record, each as a tuple of (feature, values): a columnar record (``__format__``;
    ``__rows__`` = n, every feature's n*k values row-major) holds n rows, any other tf.Example one."""
    import tensorflow as tf

    features = tf.train.Example.FromString(record).features.feature
    values = {k: list(getattr(f, f.WhichOneof("kind")).value) for k, f in features.items()}
    n = values.pop("__rows__", [1])[0] if values.pop("__format__", None) else 1
    for i in range(n):
        yield tuple(sorted((k, tuple(v[i * len(v) // n:(i + 1) * len(v) // n])) for k, v in values.items()))


def _exact_and_zscores(rows: collections.Counter):
    """(the multiset of rows without their z-score features, the z-scores of the rows in that order as an array).

    A z-score is (x - mean) / std with TFT's mean and variance, whose partial sums the runners add in different
    orders (two harnesses vs one process): they agree to float32 rounding, every other feature exactly."""
    split = sorted((tuple(kv for kv in row if not kv[0].endswith("_z")),
                    [x for k, v in row if k.endswith("_z") for x in v], n) for row, n in rows.items())
    exact = collections.Counter()
    for key, _, n in split:
        exact[key] += n
    return exact, np.asarray([z for _, z, n in split for _ in range(n)], np.float64)


def _row_diff(split: str, portable_only: list, direct_only: list) -> str:
    """The rows only one run wrote, as text; where both wrote one, the features in which the first pair differs."""
    lines = [f"{split}: {len(portable_only)} row(s) only in the portable run's output, {len(direct_only)} only in "
             f"the direct run's"]
    for p_row, d_row in zip(portable_only, direct_only):
        p_row, d_row = dict(p_row), dict(d_row)
        lines.append("  differing features (portable vs direct): " + repr(
            {k: (p_row.get(k), d_row.get(k)) for k in sorted(set(p_row) | set(d_row)) if p_row.get(k) != d_row.get(k)}))
    lines += [f"  portable only: {dict(r)!r}" for r in portable_only[len(direct_only):]]
    lines += [f"  direct only: {dict(r)!r}" for r in direct_only[len(portable_only):]]
    return "\n".join(lines)


def _outputs(out: str) -> dict:
    """What the two runs must agree on, read from the output directory through tf.io.gfile (no pipeline code)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    def read(path, mode="rb"):
        with tf.io.gfile.GFile(path, mode) as fh:
            return fh.read()

    def lines(directory, suffix):
        return sorted(line for root, _, names in tf.io.gfile.walk(directory) for name in names if name.endswith(suffix)
                      for line in read(f"{root}/{name}", "r").splitlines() if line.strip())

    transform_fn = f"{out}/transform_fn_output/transform_fn"
    vocabularies = {os.path.basename(p): read(p) for p in tf.io.gfile.glob(f"{transform_fn}/assets/*")}
    saved = saved_model_pb2.SavedModel.FromString(read(f"{transform_fn}/saved_model.pb"))
    boundaries = {}  # tft.bucketize's analyzer outputs: the [1, k] float constants the graph captured
    for node in saved.meta_graphs[0].graph_def.node:
        if node.op == "Const" and node.attr["dtype"].type == tf.float32.as_datatype_enum:
            value = tf.make_ndarray(node.attr["value"].tensor)
            if value.ndim == 2 and value.shape[0] == 1 and value.shape[1] > 1:
                boundaries[node.name] = value.ravel().tolist()
    summary = json.loads(read(f"{out}/summary.json"))
    counts = {k: summary[k] for k in ("rows_in", "rows_rejected", "rows_train", "rows_eval", "rows_test",
                                      "rejected_by_reason", "vocabulary_sizes")}
    records = {s: collections.Counter(row for r in tf.data.TFRecordDataset(
        sorted(tf.io.gfile.glob(f"{out}/data/{s}/part-*")), compression_type="GZIP") for row in _rows(r.numpy()))
        for s in ("train", "eval", "test")}
    return {"vocabularies": vocabularies, "boundaries": boundaries, "counts": counts, "records": records,
            "rejected": lines(f"{out}/rejected", ".jsonl"), "user_state": lines(f"{out}/user_state", ".jsonl")}


def test_portable_runner_matches_direct_runner(tmp_path, direct_run, portable_services):
    data = direct_run["data"]
    beam_args = ["--runner=PortableRunner", f"--job_endpoint=localhost:{portable_services['job_port']}",
                 "--environment_type=EXTERNAL", f"--environment_config=localhost:{portable_services['pool_port']}",
                 "--direct_num_workers=2"]
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, data, str(tmp_path / "portable")] + beam_args,
                              cwd=REPO, env=portable_services["env"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = driver.communicate(timeout=420)
    finally:
        _stop(driver)
    assert driver.returncode == 0, log[-4000:]

    direct, portable = direct_run["outputs"], _outputs(str(tmp_path / "portable"))
    # Independent of both runs: every row was read, the five broken rows (and only they) are in the dead letter.
    assert direct["counts"]["rows_in"] == ROWS + 5 and direct["counts"]["rows_rejected"] == 5
    assert sorted(json.loads(line)["source"] for line in direct["rejected"]) == [f"{BAD_FILE}:row {i}" for i in range(5)]
    assert {s: sum(r.values()) for s, r in direct["records"].items()} == {
        s: direct["counts"][f"rows_{s}"] for s in direct["records"]}
    assert min(direct["counts"][f"rows_{s}"] for s in ("train", "eval", "test")) > 0
    assert len(direct["vocabularies"]) >= 10 and len(direct["boundaries"]) >= 3 and direct["user_state"]
    assert all(np.all(np.diff(b) >= 0) for b in direct["boundaries"].values())
    for key in ("counts", "vocabularies", "boundaries", "rejected", "user_state"):
        assert portable[key] == direct[key], key
    for split, records in direct["records"].items():  # z-scores: to float32 rounding (see _exact_and_zscores)
        (exact, z), (p_exact, p_z) = _exact_and_zscores(records), _exact_and_zscores(portable["records"][split])
        assert p_exact == exact, _row_diff(split, sorted((p_exact - exact).elements()),
                                           sorted((exact - p_exact).elements()))
        np.testing.assert_allclose(p_z, z, rtol=1e-5, atol=1e-5, err_msg=split)

    # In a job (harnesses sharing a control endpoint), two SDK harness processes, neither the pool, the job
    # service nor this process, read the input files; together the jobs' readers read every file.
    readers = collections.defaultdict(lambda: collections.defaultdict(set))  # job -> pid -> files
    for line in portable_services["opened"].read_text().splitlines():
        pid, job, path = line.split(" ", 2)
        readers[job][int(pid)].add(os.path.basename(path))
    assert "-" not in readers and readers, dict(readers)
    assert max(len(pids) for pids in readers.values()) == 2, {job: dict(p) for job, p in readers.items()}
    pids = {pid for job in readers.values() for pid in job}
    assert not pids & (portable_services["pids"] | {os.getpid(), driver.pid})
    files = set().union(*(f for job in readers.values() for f in job.values()))
    assert files >= {f"part-0000{i}.parquet" for i in range(4)} | {BAD_FILE}


# ---- the stage without a local disk -------------------------------------------------------------------------
# On a distributed runner the workers and the driver share no local disk: every file the stage reads or writes
# must go through Beam's FileSystems or tf.io.gfile. TensorFlow's in-process ``ram://`` filesystem stands in for
# gs:// here: TensorFlow serves it natively, Beam through the FileSystem below (tf.io.gfile underneath; a test
# fixture, registered with Beam by being defined), and open(), os.path, os.makedirs, glob... cannot see it.


class _GFileChannel(io.RawIOBase):
    """A ``tf.io.gfile.GFile`` as the binary file object Beam's channels and pyarrow expect."""

    def __init__(self, path: str, mode: str):
        import tensorflow as tf

        super().__init__()
        self._file, self._mode = tf.io.gfile.GFile(path, mode), mode

    def readable(self):
        return "r" in self._mode

    def writable(self):
        return "w" in self._mode

    def seekable(self):
        return "r" in self._mode

    def readinto(self, buffer):
        data = self._file.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def write(self, data):
        self._file.write(bytes(data))
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        self._file.seek(offset, whence)
        return self._file.tell()

    def tell(self):
        return self._file.tell()

    def close(self):
        if not self.closed:
            self._file.close()
        super().close()


class _RamFileSystem(FileSystem):
    """Beam FileSystem for TensorFlow's ``ram://`` (in-process memory), through ``tf.io.gfile``."""

    @classmethod
    def scheme(cls):
        return "ram"

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        import tensorflow as tf

        tf.io.gfile.makedirs(path)

    def has_dirs(self):
        return True

    def _list(self, dir_or_prefix):
        import tensorflow as tf

        if not tf.io.gfile.isdir(dir_or_prefix):
            return
        for root, _, files in tf.io.gfile.walk(dir_or_prefix):
            for name in files:
                path = self.join(root, name)
                yield FileMetadata(path, tf.io.gfile.stat(path).length)

    def _open(self, path, mode, compression_type):
        compression_type = FileSystem._get_compression_type(path, compression_type)
        raw = _GFileChannel(path, mode)
        return raw if compression_type == CompressionTypes.UNCOMPRESSED else CompressedFile(raw, compression_type)

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        import tensorflow as tf

        tf.io.gfile.makedirs(self.split(path)[0])
        return self._open(path, "wb", compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        return self._open(path, "rb", compression_type)

    def copy(self, source_file_names, destination_file_names):
        import tensorflow as tf

        for src, dst in zip(source_file_names, destination_file_names):
            tf.io.gfile.copy(src, dst, overwrite=True)

    def rename(self, source_file_names, destination_file_names):
        import tensorflow as tf

        for src, dst in zip(source_file_names, destination_file_names):
            tf.io.gfile.rename(src, dst, overwrite=True)

    def exists(self, path):
        import tensorflow as tf

        return tf.io.gfile.exists(path)

    def size(self, path):
        import tensorflow as tf

        return tf.io.gfile.stat(path).length

    def last_updated(self, path):
        import tensorflow as tf

        return tf.io.gfile.stat(path).mtime_nsec / 1e9

    def checksum(self, path):
        return str(self.size(path))

    def metadata(self, path):
        return FileMetadata(path, self.size(path), self.last_updated(path))

    def delete(self, paths):
        import tensorflow as tf

        for path in paths:
            (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)


def _rename_ram_trees(monkeypatch):
    """TensorFlow's ``ram://`` renames a directory's own entry but not its files (local disk, GCS and HDFS move
    the tree, and TFT renames its output directories): ``tf.io.gfile.rename`` of a ram:// directory moves the
    tree here."""
    import tensorflow as tf

    rename = tf.io.gfile.rename

    def rename_tree(src, dst, overwrite=False):
        if not (str(src).startswith("ram://") and tf.io.gfile.isdir(src)):
            return rename(src, dst, overwrite)
        if tf.io.gfile.exists(dst):
            if not overwrite:
                raise tf.errors.AlreadyExistsError(None, None, f"{dst} exists")
            tf.io.gfile.rmtree(dst)
        for root, _, files in tf.io.gfile.walk(src):
            target = dst + root[len(src.rstrip("/")):]
            tf.io.gfile.makedirs(target)
            for name in files:
                tf.io.gfile.copy(f"{root}/{name}", f"{target}/{name}")
        tf.io.gfile.rmtree(src)

    monkeypatch.setattr(tf.io.gfile, "rename", rename_tree)


def _refuse_local_apis_on_ram(monkeypatch, tmp_path) -> Path:
    """Local file APIs raise on a ``ram:`` path; the working directory becomes an empty one, returned (a stray
    relative write of a URL would land there)."""
    import builtins
    import glob as globlib
    import shutil

    def guard(fn, name):
        def guarded(path, *args, **kwargs):
            if str(path).startswith("ram:"):
                raise AssertionError(f"{name}({path!r}): a local file API on a data path")
            return fn(path, *args, **kwargs)
        return guarded

    for module, names in [(builtins, ["open"]), (os, ["makedirs", "mkdir", "listdir", "remove", "rename", "stat",
                                                      "scandir"]),
                          (os.path, ["exists", "isdir", "isfile", "getsize"]), (globlib, ["glob", "iglob"]),
                          (shutil, ["rmtree", "copy", "move"])]:
        for name in names:
            monkeypatch.setattr(module, name, guard(getattr(module, name), f"{module.__name__}.{name}"))
    _rename_ram_trees(monkeypatch)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory):
    """The reference run: the DirectRunner (in this process), input and output on ``ram://`` only, local file
    APIs refusing ram: paths. Its input is also written locally (``data``) for the portable run."""
    import uuid

    import tensorflow as tf

    from pipeline.beam.preprocess import PreprocessConfig, run_preprocess
    from transforms.preprocessing import build_preprocessing_fn

    tmp = tmp_path_factory.mktemp("direct")
    local = str(tmp / "data")
    _write_data(local)
    root = f"ram://rankline-{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(f"{root}/data")
    for name in sorted(os.listdir(local)):
        if name.endswith(".parquet"):
            tf.io.gfile.copy(os.path.join(local, name), f"{root}/data/{name}")
    with pytest.MonkeyPatch.context() as mp:
        cwd = _refuse_local_apis_on_ram(mp, tmp)
        schema = _schema(f"{root}/data")
        summary = run_preprocess(schema, PreprocessConfig(output_dir=f"{root}/out"),
                                 build_preprocessing_fn(schema.contract), ["--runner=DirectRunner"])
        stray = sorted(p.name for p in cwd.iterdir())
    yield {"data": local, "out": f"{root}/out", "summary": summary, "stray": stray, "outputs": _outputs(f"{root}/out")}
    tf.io.gfile.rmtree(root)


def test_stage_reads_and_writes_only_through_beam_and_tf_filesystems(direct_run):
    """The whole Beam stage (per-user features, dead letter, TFT, shards, statistics, summary) with its input and
    output on ``ram://`` only (``direct_run``): no error, nothing written locally, right counts and dead letter."""
    import tensorflow as tf

    summary, out, outputs = direct_run["summary"], direct_run["out"], direct_run["outputs"]
    assert direct_run["stray"] == []
    assert summary["rows_in"] == ROWS + 5 and summary["rows_rejected"] == 5
    assert sorted(json.loads(line)["source"] for line in outputs["rejected"]) == [f"{BAD_FILE}:row {i}" for i in range(5)]
    assert {s: sum(r.values()) for s, r in outputs["records"].items()} == {
        s: summary[f"rows_{s}"] for s in ("train", "eval", "test")}
    assert sum(summary[f"rows_{s}"] for s in ("train", "eval", "test")) == ROWS
    for name in ("statistics.pb", "summary.json", "_PREPROCESSED.json"):
        assert tf.io.gfile.exists(f"{out}/{name}"), name
    assert outputs["user_state"] and len(outputs["vocabularies"]) >= 10


def test_run_puts_builtin_data_on_a_remote_work_dir(tmp_path, monkeypatch):
    """``pipeline.run --work-dir ram://...``: the built-in data is generated in a local cache and copied to the
    work dir, where the schema points and where it is listed and read through Beam's filesystems."""
    import tempfile
    import uuid

    import tensorflow as tf

    from pipeline import run as run_mod

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local cache
    cwd = _refuse_local_apis_on_ram(monkeypatch, tmp_path)
    root = f"ram://rankline-{uuid.uuid4().hex}"
    args = run_mod.build_parser().parse_args(["--rows", "300", "--seed", "1"])
    schema, info = run_mod.resolve_schema(args, root, {})
    assert schema.input.path.startswith(f"{root}/builtin-data/")
    files = schema.input.files()
    assert len(files) == info["files"] >= 1 and all(f.startswith(f"{root}/builtin-data/") for f in files)
    rows = 0
    for path in files:
        with _GFileChannel(path, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    assert rows == info["rows"] == 300
    assert {"user_id", "item_id", "timestamp", "click"} <= set(info["columns"])
    assert not list(cwd.iterdir())
