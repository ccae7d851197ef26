"""USSR §3.4 expansion of a trained model: add a user segment or a latent cluster, train only the new parameters.

    python -m pipeline.run --model ussr --work-dir artifacts/run                     # the base model
    python -m pipeline.expand_ussr --work-dir artifacts/run --add-segment vip         # NAME's OOV id -> new segment
    python -m pipeline.expand_ussr --work-dir artifacts/run --add-segment b2b_v2 --segment-id 3
    python -m pipeline.expand_ussr --work-dir artifacts/run --add-cluster [--t-logit X] [--t-num 100]

The model is the newest ``WORK_DIR/ussr_expanded/N`` (a Keras SavedModel an earlier expansion wrote) or else the
newest ``WORK_DIR/export/ussr/V``, whose variables are read back into a USSR built from ``config.json``.

``--add-segment NAME``: the new segment takes over one transformed segment id: by default the id the
transform graph gives NAME (a value the vocabulary never saw falls in an OOV bucket), or ``--segment-id``
(e.g. to re-learn an existing segment from the others' meta-knowledge). It trains u_{M+1} and its decoder on
the train-split rows with that id; every other segment's prediction stays bit-identical (checked on the eval
split before anything is written).
``--add-cluster``: the train rows whose -L_ib (Eq. 3) exceeds ``--t-logit`` (default: the 95th percentile)
form D_new; with at least ``--t-num`` rows the new cluster copies l* = argmax_l sum_{D_new} q(c=l|x) (Eq. 8)
and trains with L_ed (Eq. 7) on D_new.

Writes the expanded Keras model to ``WORK_DIR/ussr_expanded/N+1`` and a new servable version under
``WORK_DIR/export/ussr/`` (or ``--export-dir``); prints per-segment eval AUC before and after.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Dict, List, Optional

import numpy as np

logger = logging.getLogger("rankline.expand_ussr")

MODEL_NAME = "ussr"
KERAS_DIR = "ussr_expanded"


class ExpansionError(Exception):
    """A problem with the request or the work directory: one line, exit code 2."""


def _numbered(path: str) -> List[int]:
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path) if re.fullmatch(r"\d+", n))


def load_work_dir(work_dir: str):
    """(resolved run config, contract, TFTransformOutput, preprocessed dir) of a ``pipeline.run`` work dir."""
    import tensorflow_transform as tft

    from pipeline.beam.preprocess import TRANSFORM_DIR
    from transforms.schema import builtin_schema_path, load_schema

    path = os.path.join(work_dir, "config.json")
    if not os.path.exists(path):
        raise ExpansionError(f"{work_dir}: no config.json (run `python -m pipeline.run --model ussr` first)")
    with open(path) as fh:
        run_config = json.load(fh)
    if run_config.get("model") != MODEL_NAME:
        raise ExpansionError(f"{work_dir}: the run trained {run_config.get('model')!r}, not {MODEL_NAME!r}")
    info = run_config.get("input", {})
    input_path = os.path.join(info["dir"], "part-*.parquet") if info.get("source") == "builtin" else None
    schema = load_schema(info.get("schema") or builtin_schema_path("builtin"), input_path=input_path)
    pp_dir = os.path.join(work_dir, "preprocessed")
    return run_config, schema.contract, tft.TFTransformOutput(os.path.join(pp_dir, TRANSFORM_DIR)), pp_dir


def load_model(work_dir: str, run_config: Dict, contract, tft_output, model_dir: Optional[str] = None):
    """(model, where it came from): ``model_dir``, the newest expansion, or the newest export's variables."""
    import tensorflow as tf

    from models import registry
    from models.keras import keras
    from pipeline.training.train import model_inputs

    expansions = _numbered(os.path.join(work_dir, KERAS_DIR))
    if model_dir is None and expansions:
        model_dir = os.path.join(work_dir, KERAS_DIR, str(expansions[-1]))
    if model_dir is not None:
        return keras.models.load_model(model_dir), model_dir
    export_base = os.path.join(work_dir, "export", MODEL_NAME)
    versions = _numbered(export_base)
    if not versions:
        raise ExpansionError(f"{work_dir}: no export under {export_base} and no {KERAS_DIR}/ model")
    export = os.path.join(export_base, str(versions[-1]))
    categorical, dense, sequences = model_inputs(contract, tft_output)
    cfg = registry.resolve_config(MODEL_NAME, "default", run_config["model_config"])
    cfg = registry.model_class(MODEL_NAME).bind_to_contract(cfg, contract, tuple(categorical) + tuple(sequences)
                                                             + tuple(dense))
    model = registry.build(MODEL_NAME, categorical, dense, cfg, sequences)
    model(model.probe_features())
    # The export's root object is the serving module; its ``model`` child is the Keras model.
    tf.train.Checkpoint(model=model).read(os.path.join(export, "variables", "variables")).expect_partial() \
        .assert_existing_objects_matched()
    return model, export


def segment_id_of(name: str, contract, tft_output) -> int:
    """The transformed id the transform graph gives segment value ``name`` (an OOV bucket when unseen)."""
    import tensorflow as tf

    feature = next((f for f in contract.vocab_features if f.name == contract.segment), None)
    if feature is None:
        raise ExpansionError(f"segment column {contract.segment!r} has no vocabulary; pass --segment-id")
    vocab = [v.decode() if isinstance(v, bytes) else str(v) for v in tft_output.vocabulary_by_name(feature.vocab_name)]
    if name in vocab:
        raise ExpansionError(f"{name!r} is already segment {vocab.index(name)} of the vocabulary; choose a new name "
                             "or take over an id with --segment-id")
    init = tf.lookup.TextFileInitializer(tft_output.vocabulary_file_by_name(feature.vocab_name), tf.string,
                                         tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
                                         tf.lookup.TextFileIndex.LINE_NUMBER)
    table = tf.lookup.StaticVocabularyTable(init, feature.num_oov_buckets)  # what tft.apply_vocabulary builds
    return int(table.lookup(tf.constant([name])).numpy()[0])


def _arrays(model, contract, tft_output, pattern: str, batch_size: int = 4096):
    """All (features, labels) of ``pattern`` as numpy dicts (the model's inputs and its labels)."""
    from models import registry
    from pipeline.training.data import make_dataset

    ds = make_dataset(pattern, tft_output.transformed_feature_spec(), contract.model_feature_names(),
                      registry.required_labels(MODEL_NAME), batch_size)
    feats: Dict[str, list] = {}
    labels: Dict[str, list] = {}
    for f, l in ds:
        for k, v in f.items():
            feats.setdefault(k, []).append(v.numpy())
        for k, v in l.items():
            labels.setdefault(k, []).append(v.numpy())
    return ({k: np.concatenate(v) for k, v in feats.items()}, {k: np.concatenate(v) for k, v in labels.items()})


def _take(arrays: Dict[str, np.ndarray], mask: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: v[mask] for k, v in arrays.items()}


def _fit(model, feats, labels, epochs: int, batch_size: int, learning_rate: float, seed: int) -> None:
    import tensorflow as tf

    from models.keras import keras

    keras.utils.set_random_seed(seed)
    ds = tf.data.Dataset.from_tensor_slices((feats, labels)).shuffle(len(next(iter(labels.values()))), seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    model.fit(ds.batch(batch_size), epochs=epochs, verbose=2)


def _predict(model, feats, batch_size: int = 4096) -> np.ndarray:
    n = len(next(iter(feats.values())))
    return np.concatenate([model({k: v[i:i + batch_size] for k, v in feats.items()}, training=False)["ctr"].numpy()
                           .reshape(-1) for i in range(0, n, batch_size)])


def _segment_aucs(y, p, seg) -> Dict[int, float]:
    from pipeline.evaluation.metrics import segment_auc

    return {int(k): v for k, v in segment_auc(y, p, seg).per_segment.items()}


def expand(work_dir: str, add_segment: Optional[str] = None, segment_id: Optional[int] = None,
           add_cluster: bool = False, t_logit: Optional[float] = None, t_num: int = 100, epochs: int = 2,
           learning_rate: float = 1e-3, seed: int = 0, model_dir: Optional[str] = None,
           export_dir: Optional[str] = None) -> Dict:
    """Runs one expansion (see the module docstring); returns a summary dict."""
    from pipeline.beam.preprocess import TRANSFORM_DIR, transformed_pattern
    from serving.export import export_saved_model

    if bool(add_segment) == bool(add_cluster):
        raise ExpansionError("give exactly one of --add-segment NAME and --add-cluster")
    run_config, contract, tft_output, pp_dir = load_work_dir(work_dir)
    model, source = load_model(work_dir, run_config, contract, tft_output, model_dir)
    logger.info("expanding %s (segments %d, clusters %d)", source, model.num_segments, model.num_clusters)
    seg_key = model.config.segment_feature
    if add_segment:
        sid = int(segment_id) if segment_id is not None else segment_id_of(add_segment, contract, tft_output)
        if not 0 <= sid < model.base_segments:
            raise ExpansionError(f"segment id {sid} outside the model's ids [0, {model.base_segments})")
        if sid in model.config.added_segment_ids:
            taken = model.config.added_segments[model.config.added_segment_ids.index(sid)]
            raise ExpansionError(f"segment id {sid} was already taken over by added segment {taken!r}")
    train_x, train_y = _arrays(model, contract, tft_output, transformed_pattern(pp_dir, "train"))
    eval_x, eval_y = _arrays(model, contract, tft_output, transformed_pattern(pp_dir, "eval"))
    eval_seg = eval_x[seg_key].reshape(-1)
    y_eval = eval_y["click"].reshape(-1)
    before = _predict(model, eval_x)
    summary: Dict = {"source": source}
    if add_segment:
        mask = train_x[seg_key].reshape(-1) == sid
        if not mask.any():
            raise ExpansionError(f"no training rows carry segment id {sid} ({add_segment!r}); nothing to learn from")
        new = model.expand([(add_segment, sid)])
        _fit(new, _take(train_x, mask), _take(train_y, mask), epochs, model.config.batch_size, learning_rate, seed)
        after = _predict(new, eval_x)
        others = eval_seg != sid
        if not np.array_equal(after[others], before[others]):
            raise ExpansionError("internal error: predictions of the existing segments changed; nothing written")
        summary.update(added_segment=add_segment, segment_id=sid, train_rows=int(mask.sum()),
                       existing_segments_identical=True)
    else:
        loss = np.concatenate([
            model.bottleneck_loss_per_example({k: v[i:i + 4096] for k, v in train_x.items()},
                                              {k: v[i:i + 4096] for k, v in train_y.items()}).numpy()
            for i in range(0, len(train_y["click"]), 4096)])
        threshold = float(np.percentile(loss, 95)) if t_logit is None else float(t_logit)
        mask = loss > threshold
        if mask.sum() < t_num:
            raise ExpansionError(f"D_new holds {int(mask.sum())} rows with -L_ib > {threshold:.4g}, fewer than "
                                 f"--t-num {t_num}; no cluster added")
        d_new = (_take(train_x, mask), _take(train_y, mask))
        usage = model.cluster_usage([(d_new[0], d_new[1])])
        l_star = int(np.argmax(usage))                                                       # Eq. 8
        new = model.expand(add_cluster_from=l_star)
        _fit(new, d_new[0], d_new[1], epochs, model.config.batch_size, learning_rate, seed)  # Eq. 7
        new.objective = "full"
        after = _predict(new, eval_x)
        summary.update(added_cluster_from=l_star, t_logit=threshold, d_new_rows=int(mask.sum()),
                       cluster_usage=usage.tolist())
    summary["segment_auc_before"] = _segment_aucs(y_eval, before, eval_seg)
    summary["segment_auc_after"] = _segment_aucs(y_eval, after, eval_seg)
    for layer in new.layers:
        layer.trainable = True
    keras_base = os.path.join(work_dir, KERAS_DIR)
    out = os.path.join(keras_base, str((_numbered(keras_base) or [0])[-1] + 1))
    new.save(out, save_format="tf")
    summary["keras_model"] = out
    summary["export"] = export_saved_model(new, os.path.join(pp_dir, TRANSFORM_DIR), contract,
                                           os.path.abspath(export_dir or os.path.join(work_dir, "export")),
                                           MODEL_NAME)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.expand_ussr", description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", required=True, help="a `pipeline.run --model ussr` work directory")
    p.add_argument("--add-segment", metavar="NAME", default=None)
    p.add_argument("--segment-id", type=int, default=None, help="transformed segment id the new segment takes over")
    p.add_argument("--add-cluster", action="store_true")
    p.add_argument("--t-logit", type=float, default=None, help="-L_ib threshold of D_new (default: 95th percentile)")
    p.add_argument("--t-num", type=int, default=100, help="minimum rows in D_new")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="Keras SavedModel to expand (default: see above)")
    p.add_argument("--export-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = expand(os.path.abspath(args.work_dir), args.add_segment, args.segment_id, args.add_cluster,
                         args.t_logit, args.t_num, args.epochs, args.learning_rate, args.seed, args.model_dir,
                         args.export_dir)
    except ExpansionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
