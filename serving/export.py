"""Export: a SavedModel that TF Serving loads, taking RAW features with the transform graph inside.

Layout: ``<export_base>/<model_name>/<version>/`` with integer versions. A version is written into a hidden
temporary directory beside it (``.tmp-<hex>``: TF Serving ignores names that do not parse as integers),
checked, fsynced, then renamed into place under an exclusive claim ``.reserve-<N>``, so a half-written or
unservable version is never visible, two concurrent exports never take the same number, and an existing
version is never overwritten. A publish killed mid-way leaves at most a ``.tmp-*`` directory (and, killed
during the rename, a ``.reserve-*`` file), which TF Serving and ``next_version`` ignore and the next export
removes (``remove_stale``). Remote bases (``gs://`` ...) have no atomic rename: see ``publish_remote``.

Signatures (B = batch of impressions, e.g. one user's N candidates):

* ``serving_default``: ``examples`` tf.string [B], serialized raw ``tf.Example``s (label-free; a missing
  value is an absent feature) -> one float32 [B] output per task (``ctr``, ``ctavr``, ``cvr``, ``ctcvr``).
* ``predict_raw``: one 1-D [B] tensor per raw serving column, named after the column, dtype from the
  contract (string / int64 / float32), e.g. REST ``{"signature_name": "predict_raw", "instances":
  [{"user_id": 7, "device": "ios", ...}]}`` -> the same task outputs. Every value must be present: a dense
  tensor cannot express a missing value, so rows with missing values go through ``serving_default``.
  A sequence column is one string with the contract's separator between tokens (as in the raw data).
* ``transform_features``: ``examples`` as above -> the transformed model inputs (int64 / float32 [B, 1],
  named as in ``transforms.features``), for debugging training/serving skew.

``assets.extra/tf_serving_warmup_requests`` (see ``serving.warmup``) is written when the caller passes
real serialized raw examples (``warmup_examples``); TF Serving replays it before marking the version
AVAILABLE.

Speed: for a plain ESM² the signatures run ``serving.scoring_graph.ESM2ScoringGraph`` (request-level work
once per request), verified against the Keras model before publishing; other models serve the Keras model.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from typing import Dict, List, Sequence

import tensorflow as tf

from transforms import features as F
from transforms.features import FeatureContract

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^\d+$")
_DTYPES = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}


def request_level_fields(contract: FeatureContract) -> Sequence[str]:
    """Transformed categorical inputs that describe the request (user, context, hour), not the candidate.

    Candidate-level: the item id column and every raw column whose name contains ``item`` (``item_price``,
    ``uf_item_in_history``); everything else (user profile and history, device, page, hour) is
    request-level. A wrong guess costs speed, never correctness (see ``serving.scoring_graph``).
    """
    item = getattr(contract, "item_id", None) or "item"

    def is_candidate(raw: str) -> bool:
        return raw == item or "item" in raw

    out = [F.categorical_id(f.name) for f in contract.categorical if not is_candidate(f.name)]
    out += [F.bucket_id(f.name) for f in contract.numeric if not is_candidate(f.name)]
    out += [F.sequence_ids(f.name) for f in getattr(contract, "sequences", ()) if not is_candidate(f.name)]
    if getattr(contract, "timestamp", None):
        out.append(F.HOUR_ID)
    return out


class ServingModule(tf.Module):
    """Wires parse -> transform graph -> scorer for serving; tracks the transform layer and the scorer.

    ``scorer``: a callable on the transformed features (dict of [B, 1]) returning {task: [B, 1]}; default the
    Keras ``model`` (called with ``training=False``). Only the scorer's variables are saved.
    """

    def __init__(self, model, tft_output, raw_spec: Dict, feature_keys: Sequence[str], output_names: Sequence[str],
                 scorer=None, sequences: Sequence = ()):
        super().__init__(name="rankline_serving")
        if scorer is None:
            self.model = model
            self._score = lambda feats: self.model(feats, training=False)
        else:
            self.scorer = scorer
            self._score = lambda feats: self.scorer(feats)
        self.tft_layer = tft_output.transform_features_layer()
        self._raw_spec = dict(raw_spec)
        self._feature_keys = list(feature_keys)
        self._output_names = list(output_names)
        self._sequences = {s.name: s for s in sequences}
        self.serve_examples = tf.function(
            self._serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        self.transform_examples = tf.function(
            self._transform_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        raw_signature = {name: tf.TensorSpec([None], self._column_dtype(name, spec), name=name)
                         for name, spec in self._raw_spec.items()}
        self.serve_raw = tf.function(self._serve_raw, input_signature=[raw_signature])

    def _column_dtype(self, name: str, spec) -> tf.DType:
        return tf.string if name in self._sequences else spec.dtype

    def _transform(self, raw) -> Dict[str, tf.Tensor]:
        transformed = self.tft_layer(raw)
        missing = [k for k in self._feature_keys if k not in transformed]
        if missing:  # resolved at trace time: a contract/model mismatch can never be exported
            raise ValueError(f"transform graph does not produce model input(s) {missing}")
        return {k: transformed[k] for k in self._feature_keys}

    def _predict(self, raw) -> Dict[str, tf.Tensor]:
        outputs = self._score(self._transform(raw))
        # [B, 1] probabilities are served as [B]; wider outputs (e.g. a scenario distribution) stay [B, K].
        return {name: tf.reshape(outputs[name], [-1]) if outputs[name].shape[-1] == 1 else outputs[name]
                for name in self._output_names}

    def _serve_examples(self, examples):
        return self._predict(tf.io.parse_example(examples, self._raw_spec))

    def _transform_examples(self, examples):
        return self._transform(tf.io.parse_example(examples, self._raw_spec))

    def _serve_raw(self, columns):
        """Dense 1-D columns -> the structure ``parse_example`` gives (every value present)."""
        raw = {}
        for name, spec in self._raw_spec.items():
            x = columns[name]
            if isinstance(spec, tf.io.VarLenFeature):
                if name in self._sequences:
                    seq = self._sequences[name]
                    tokens = tf.strings.split(x, sep=seq.separator)
                    tokens = tf.ragged.boolean_mask(tokens, tf.strings.length(tokens) > 0)
                    raw[name] = tokens[:, -seq.max_length:].to_sparse()
                else:
                    n = tf.shape(x, out_type=tf.int64)[0]
                    indices = tf.stack([tf.range(n), tf.zeros([n], tf.int64)], axis=1)
                    raw[name] = tf.SparseTensor(indices, x, tf.stack([n, tf.constant(1, tf.int64)]))
            else:
                raw[name] = x
        return self._predict(raw)

    def signature_functions(self) -> Dict:
        return {"serving_default": self.serve_examples.get_concrete_function(),
                "predict_raw": self.serve_raw.get_concrete_function(),
                "transform_features": self.transform_examples.get_concrete_function()}


def next_version(model_dir: str) -> int:
    """1 + the highest published version under ``model_dir`` (1 when none); only all-digit names count."""
    if not tf.io.gfile.isdir(model_dir):
        return 1
    versions = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(model_dir) if _VERSION_RE.match(n.rstrip("/"))]
    return max(versions, default=0) + 1


def is_remote(path: str) -> bool:
    """True for a URL-like base (``gs://``, ``s3://``, ``hdfs://``, ``ram://`` ...): no atomic ``os.rename``."""
    return "://" in path and not path.startswith("file://")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _makedirs_durable(path: str) -> None:
    """``os.makedirs`` that also fsyncs the parent of every directory it created (so a crash right after
    cannot lose the new ``<export_base>/<model_name>`` entry while a version inside it survives)."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    for created in reversed(missing):
        _fsync_path(os.path.dirname(created))


# ---------------------------------------------------------------------------------------------------------
# Hidden entries of a model directory. TF Serving's FileSystemStoragePathSource only treats a child of the
# base path as a version when ``absl::SimpleAtoi(child)`` parses it (ParseVersionNumber in
# tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc, tensorflow/serving@9d981c5,
# line 87-89: ``return absl::SimpleAtoi(version_path.c_str(), version_number);``; IndexChildrenByVersion
# skips the others). SimpleAtoi accepts only optional spaces, a sign and digits, so a name starting with "."
# is never a version: ``.tmp-<hex>`` (a version being written) and ``.reserve-<N>`` (a claim on number N)
# are invisible to the server, and ``<N>`` appears only by one rename of a complete, checked directory.
# ---------------------------------------------------------------------------------------------------------
_TMP_PREFIX = ".tmp-"
_RESERVE_PREFIX = ".reserve-"
_OWNER = "owner.json"
STALE_AFTER_S = 24 * 3600.0


def _owner_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale(owner_text: str | None, mtime: float | None, now: float, stale_after_s: float) -> bool:
    """Stale = its writer can no longer finish it: the owner (pid, host) recorded in it is a dead process of
    THIS host, or it is older than ``stale_after_s`` (owner on another host sharing the filesystem, a pid
    that may have been reused, or no owner record: left by an older rankline or killed before writing it)."""
    try:
        owner = json.loads(owner_text) if owner_text else {}
        pid, host, started = int(owner["pid"]), owner["host"], float(owner["started"])
    except (ValueError, KeyError, TypeError):  # no owner record (yet), or not ours
        pid, host, started = None, None, mtime
    if host == socket.gethostname() and not _pid_alive(pid):
        return True
    return started is not None and now - started > stale_after_s


def _read_text(path: str) -> str | None:
    try:
        with tf.io.gfile.GFile(path, "r") as fh:
            return fh.read()
    except (tf.errors.OpError, OSError):
        return None


def _mtime(path: str) -> float | None:
    try:
        return tf.io.gfile.stat(path).mtime_nsec / 1e9
    except (tf.errors.OpError, OSError):
        return None


def remove_stale(model_dir: str, stale_after_s: float = STALE_AFTER_S) -> List[str]:
    """Deletes the ``.tmp-*`` and ``.reserve-*`` entries of ``model_dir`` whose writer crashed (``_is_stale``;
    a reservation is also stale once its version is published); returns their names. Live exports'
    entries are kept: they carry their writer's pid and host in ``owner.json``. Safe to race with exports
    and other cleaners: a ``.tmp-*`` name is unique to one export, and a reservation taken again after
    its removal is only a claim (the publishing rename never replaces a non-empty version)."""
    if not tf.io.gfile.isdir(model_dir):
        return []
    now, removed = time.time(), []
    for name in sorted(n.rstrip("/") for n in tf.io.gfile.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.startswith(_TMP_PREFIX):
            stale = _is_stale(_read_text(os.path.join(path, _OWNER)), _mtime(path), now, stale_after_s)
        elif name.startswith(_RESERVE_PREFIX):
            number = name[len(_RESERVE_PREFIX):]
            stale = (tf.io.gfile.exists(os.path.join(model_dir, number))
                     or _is_stale(_read_text(path), _mtime(path), now, stale_after_s))
        else:
            continue
        if stale:
            try:
                if tf.io.gfile.isdir(path):
                    tf.io.gfile.rmtree(path)
                else:
                    tf.io.gfile.remove(path)
            except (tf.errors.NotFoundError, FileNotFoundError):
                pass  # another cleaner was first
            removed.append(name)
            logger.warning("export: removed stale %s (left by a crashed export)", path)
    return removed


def _reserve(model_dir: str, version: int) -> str | None:
    """Claims ``version``: atomically creates ``.reserve-<version>`` (O_CREAT|O_EXCL, its content the owner);
    None when another export holds the claim or the version is already published."""
    marker = os.path.join(model_dir, f"{_RESERVE_PREFIX}{version}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as fh:
        fh.write(_owner_record())
    if os.path.lexists(os.path.join(model_dir, str(version))):  # published before we claimed it
        _unlink_quietly(marker)
        return None
    return marker


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _publish_local(staged: str, model_dir: str, version: int | None) -> str:
    """Renames the complete, fsynced ``staged`` directory to ``model_dir/<N>`` and fsyncs ``model_dir``.

    N = ``version``, or the next free number: claimed with ``_reserve`` (a claim held by a concurrent
    export, or a version published meanwhile, -> the next number). The rename is the last line of defence:
    it fails rather than replace a non-empty ``<N>`` (a writer that takes no claims), and the next number
    is tried then too."""
    number = next_version(model_dir) if version is None else int(version)
    while True:
        marker = _reserve(model_dir, number)
        if marker is not None:
            final = os.path.join(model_dir, str(number))
            try:
                os.rename(staged, final)  # atomic within one filesystem
                _fsync_path(model_dir)
                return final
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            finally:
                _unlink_quietly(marker)  # (a cleaner may have removed it: its version exists)
        if version is not None:
            raise FileExistsError(f"export version {number} of {model_dir} already exists or is being written "
                                  "by another export (never overwritten)")
        number += 1


def _local_files(root: str) -> Dict[str, int]:
    """{path relative to ``root``: size} of every file of a local directory."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


def _copy_files(files: Dict[str, int], src: str, dst: str) -> None:
    """``tf.io.gfile.copy`` of each listed file from ``src`` to ``dst`` (never overwriting), then a size
    check of every copy. The list comes from the local source: listings of remote filesystems are not
    trusted (ram:// lists ``assets.extra`` as a child ``.extra`` of ``assets``)."""
    for rel in sorted(files):
        tf.io.gfile.makedirs(os.path.dirname(os.path.join(dst, rel)))
        tf.io.gfile.copy(os.path.join(src, rel), os.path.join(dst, rel), overwrite=False)
    wrong = [rel for rel, size in sorted(files.items()) if tf.io.gfile.stat(os.path.join(dst, rel)).length != size]
    if wrong:
        raise IOError(f"{dst}: copied file(s) {wrong[:5]} differ in size from {src}")


def _remove_quietly(root: str, files: Dict[str, int]) -> None:
    """Best-effort removal of a partial copy (its listed files, then the tree); logs what is left."""
    for rel in files:
        try:
            tf.io.gfile.remove(os.path.join(root, rel))
        except (tf.errors.OpError, OSError):
            pass
    try:
        if tf.io.gfile.exists(root):
            tf.io.gfile.rmtree(root)
    except (tf.errors.OpError, OSError):
        pass
    if tf.io.gfile.exists(root):
        logger.error("export: could not remove %s; delete it (it is not a servable version)", root)


def publish_remote(saved_model_dir: str, model_dir: str, version: int | None = None) -> int:
    """Copies a complete, checked LOCAL SavedModel to a base without atomic rename (``gs://``, ``s3://``,
    ``ram://``) and returns its version N. THE VERSION IS NOT SERVABLE YET: the caller makes it servable by
    adding N to the model's ``specific`` version policy (``serving.tf_serving_config.ServedModel.versions``)
    and reloading the config; a model directory on such a base must never be served with the ``latest`` or
    ``all`` policy, which would load ``<N>`` while its files are still being copied.

    Steps: copy into ``.tmp-<hex>/version`` (not a version name, see above; ``owner.json`` beside it);
    pick N (``version`` or the next number; no atomic claim exists on these filesystems, so concurrent
    exports to one remote model directory must pass distinct explicit versions); copy file by file into
    ``<N>`` (``tf.io.gfile.rename`` is a per-object copy on object stores, and on ram:// it does not move a
    directory's files at all); check every file's size; remove the staging copy. On failure nothing is
    returned, and ``<N>`` (if this call started it) and the staging copy are removed.
    """
    files = _local_files(saved_model_dir)
    if "saved_model.pb" not in files:
        raise FileNotFoundError(f"{saved_model_dir}: no saved_model.pb (not a SavedModel version directory)")
    tf.io.gfile.makedirs(model_dir)
    remove_stale(model_dir)
    staging = os.path.join(model_dir, f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}")
    final = None  # set once this call starts writing <N>
    try:
        tf.io.gfile.makedirs(staging)
        with tf.io.gfile.GFile(os.path.join(staging, _OWNER), "w") as fh:
            fh.write(_owner_record())
        staged = os.path.join(staging, "version")
        _copy_files(files, saved_model_dir, staged)
        number = next_version(model_dir) if version is None else int(version)
        if tf.io.gfile.exists(os.path.join(model_dir, str(number))):
            raise FileExistsError(f"export version {number} of {model_dir} already exists (never overwritten)")
        final = os.path.join(model_dir, str(number))
        _copy_files(files, staged, final)
    except tf.errors.AlreadyExistsError:
        raise  # another writer's <N> (the one-writer contract was broken): leave it alone
    except BaseException:
        if final is not None:
            _remove_quietly(final, files)
        raise
    finally:
        _remove_quietly(staging, {**{os.path.join("version", k): v for k, v in files.items()}, _OWNER: 0})
    return number


def build_scorer(model, contract: FeatureContract, optimize: bool = True, preproject_max_bytes: int = 0):
    """The optimised ESM² scoring graph, verified against ``model``; None (serve the Keras model) when the
    model is not a plain ESM² or ``optimize`` is off. ``preproject_max_bytes``: total size cap of the
    pre-projected embedding tables (``serving.scoring_graph``; 0 = off, the default: slower on CPU)."""
    if not optimize:
        return None
    from serving.scoring_graph import ESM2ScoringGraph, UnsupportedModel, probe_features, verify

    try:
        graph = ESM2ScoringGraph(model, request_level_fields(contract), preproject_max_bytes=preproject_max_bytes)
        worst = verify(graph, model, probe_features(model))
    except UnsupportedModel as exc:
        logger.info("export: serving the Keras model as is (%s)", exc)
        return None
    logger.info("export: optimised ESM² scoring graph (max |diff| vs Keras %.2g)", worst)
    return graph


def export_saved_model(model, tft_output_dir: str, contract: FeatureContract, export_base: str, model_name: str,
                       version: int | None = None, *, warmup_examples: Sequence[bytes] | None = None,
                       optimize: bool = True, check: bool = True, preproject_max_bytes: int = 0,
                       remote: bool | None = None) -> str:
    """Writes a new version of ``model_name`` and returns its directory ``<export_base>/<model_name>/<N>``.

    ``warmup_examples``: serialized raw ``tf.Example``s (e.g. eval rows) for the TF Serving warmup file;
    they are scored once in-process first, so a bad example fails the export, not the server.
    ``optimize``: serve the verified ESM² scoring graph where possible (``preproject_max_bytes``: its
    pre-projected embeddings' size cap, 0 = off; see ``build_scorer``). ``check``: reject the version
    (nothing published) if stock TF Serving could not run it (``serving.graph_check``).
    ``version``: the number to publish (FileExistsError if taken); default the next free one.

    Local base (``remote`` False, the default for a plain path): written in ``.tmp-<hex>/version``, checked,
    fsynced, then renamed to ``<N>`` while holding the claim ``.reserve-<N>`` (see ``_publish_local``), so
    concurrent exports (processes) get distinct versions and a version is servable the moment it appears.
    Stale ``.tmp-*`` / ``.reserve-*`` entries of crashed exports are removed first (``remove_stale``).
    Remote base (``remote`` True, the default for ``gs://`` and other URLs): written and checked in a
    local temporary directory, then ``publish_remote``: the returned version is NOT servable until the
    caller adds ``int(os.path.basename(path))`` to the model's ``specific`` version policy.
    """
    import tensorflow_transform as tft

    from serving import warmup
    from serving.graph_check import check_servable
    from transforms.preprocessing import raw_feature_spec

    remote = is_remote(export_base) if remote is None else remote
    model_dir = os.path.join(export_base, model_name)
    if remote:
        tf.io.gfile.makedirs(model_dir)
    else:
        _makedirs_durable(model_dir)
        remove_stale(model_dir)
    if version is not None and tf.io.gfile.exists(os.path.join(model_dir, str(int(version)))):
        raise FileExistsError(f"export version already exists (never overwritten): "
                              f"{os.path.join(model_dir, str(int(version)))}")
    module = ServingModule(
        model, tft.TFTransformOutput(tft_output_dir),
        raw_feature_spec(contract, include_labels=False, include_oracle=False),
        contract.model_feature_names(), model.output_names_,
        scorer=build_scorer(model, contract, optimize, preproject_max_bytes),
        sequences=getattr(contract, "sequences", ()))
    records = None
    if warmup_examples is not None:
        records = warmup.build_records(model_name, warmup_examples)
        try:  # replay in-process: a warmup request the server would reject must fail here
            module.serve_examples(tf.constant(list(warmup_examples), dtype=tf.string))
        except tf.errors.OpError as exc:
            raise ValueError(f"warmup examples do not score through the export: {exc.message}") from None
    if remote:
        work = tempfile.mkdtemp(prefix="rankline-export-")
    else:
        work = os.path.join(model_dir, f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}")
        os.mkdir(work)
        with open(os.path.join(work, _OWNER), "w") as fh:
            fh.write(_owner_record())
    tmp = os.path.join(work, "version")
    try:
        tf.saved_model.save(module, tmp, signatures=module.signature_functions())
        if records:
            warmup.write_warmup_file(tmp, records)
        if check:
            check_servable(tmp)
        if remote:
            return os.path.join(model_dir, str(publish_remote(tmp, model_dir, version)))
        _fsync_tree(tmp)
        return _publish_local(tmp, model_dir, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
