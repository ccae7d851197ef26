"""A serving-only forward pass of a trained ESM² that does the per-request work once per request.

Ranking requests score one user against N candidates: the user and context fields (user id, profile,
device, page, hour, ...) are the same in every row. The first layer of every tower is linear in the
concatenated field embeddings, so it splits exactly into a request-level part and a candidate-level part:

    x W1 + b1 = x_req W1_req + x_cand W1_cand + b1        (W1 = the four towers' kernels side by side)

``x_req W1_req`` is computed once per distinct request-level id tuple in the batch (``UniqueV2`` over the
rows of the [B, R] id matrix) and gathered back to the rows; the candidate part and the deeper layers run
per row. All four towers share one first-layer matmul. Nothing is approximated: results equal the Keras
model's up to float32 summation order (checked at export, see ``serving.export``).

Ops used are core TensorFlow (UniqueV2, GatherV2, MatMul, BiasAdd, Relu, Sigmoid, ...), so stock TF
Serving runs the graph; weights are ordinary variables saved in ``variables/``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np
import tensorflow as tf

from transforms.features import CTAVR, CTCVR, CTR, CVR


class UnsupportedModel(ValueError):
    """The model is not a plain ESM² this graph reproduces (the export then serves the Keras model)."""


def _structure(model):
    """(embedding, towers) of a plain ESM², or raises UnsupportedModel naming what differs."""
    name = type(model).__name__
    if name != "ESM2":
        raise UnsupportedModel(f"model class {name} (only ESM2 has an optimised scoring graph)")
    emb = getattr(model, "embedding", None)
    towers = getattr(model, "towers", None)
    if emb is None or towers is None or len(towers) != 4:
        raise UnsupportedModel("ESM2 without .embedding and four .towers")
    if not hasattr(emb, "_tables") or list(emb._tables) != list(emb.categorical):  # noqa: SLF001
        raise UnsupportedModel("SharedEmbedding layout changed (tables not in categorical order)")
    if list(getattr(emb, "_seq_tables", {})) != list(getattr(emb, "sequences", {})):
        raise UnsupportedModel("SharedEmbedding layout changed (sequence tables not in sequence order)")
    tables = list(emb._tables.values()) + list(getattr(emb, "_seq_tables", {}).values())  # noqa: SLF001
    if not all(t.built for t in tables):
        raise UnsupportedModel("the model is not built (call it once before exporting)")
    if getattr(emb, "dense_activation", None) not in ("tanh", "linear"):
        raise UnsupportedModel(f"dense activation {getattr(emb, 'dense_activation', None)!r}")
    for tower in towers:
        dense = getattr(tower, "_dense", None)
        out = getattr(tower, "_out", None)
        if not dense or out is None:
            raise UnsupportedModel(f"tower {tower.name}: expected hidden Dense layers and a logit layer")
        for layer in dense:
            if layer.activation.__name__ != "relu" or not layer.use_bias:
                raise UnsupportedModel(f"tower {tower.name}: hidden layer {layer.name} is not Dense+bias+relu")
        if out.activation.__name__ != "linear" or not out.use_bias or out.units != 1:
            raise UnsupportedModel(f"tower {tower.name}: logit layer is not a linear Dense(1)")
    widths = {tower._dense[0].units for tower in towers}  # noqa: SLF001
    if len(widths) != 1:
        raise UnsupportedModel(f"towers' first layers differ in width {sorted(widths)}")
    return emb, towers


class _Side:
    """One side (request or candidate) of the first layer: its categorical fields share one concatenated
    table (ids shifted by per-field offsets, so one gather serves them all); sequences keep their tables."""

    def __init__(self, categorical: Sequence[str], sequences: Sequence[str]):
        self.categorical, self.sequences = list(categorical), list(sequences)

    @property
    def fields(self) -> List[str]:
        return self.categorical + self.sequences


class ESM2ScoringGraph(tf.Module):
    """ESM² inference: transformed features -> {ctr, ctavr, cvr, ctcvr} each [B, 1].

    Inputs: categorical ids int64 [B, 1], sequence ids int64 [B, L] (0 = padding; embedded as the masked
    mean, as ``SharedEmbedding``), dense float32 [B, 1].
    ``request_fields``: categorical / sequence inputs that are usually equal across a request's rows (user
    and context fields). Any subset gives identical results; the choice only sets what is shared.
    """

    def __init__(self, model, request_fields: Sequence[str]):
        super().__init__(name="esm2_scoring_graph")
        emb, towers = _structure(model)
        d = self._dim = int(emb.embedding_dim)
        self._tanh = emb.dense_activation == "tanh"
        categorical, sequences = list(emb.categorical), list(getattr(emb, "sequences", {}))
        fields = categorical + sequences  # W1 row blocks, in SharedEmbedding's order
        self._dense_names = list(emb.dense)
        wanted = set(request_fields)
        self._req = _Side([n for n in categorical if n in wanted], [n for n in sequences if n in wanted])
        self._cand = _Side([n for n in categorical if n not in wanted], [n for n in sequences if n not in wanted])
        layers = dict(emb._tables, **getattr(emb, "_seq_tables", {}))  # noqa: SLF001
        weights = {n: layers[n].embeddings.numpy() for n in fields}

        def merged(names: Sequence[str], side: str):
            sizes = [weights[n].shape[0] for n in names]
            offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
            table = np.concatenate([weights[n] for n in names], 0) if names else np.zeros((1, d), np.float32)
            return tf.Variable(table, trainable=False, name=f"{side}_table"), tf.constant(offsets[None, :])

        self.request_table, self._req_offsets = merged(self._req.categorical, "request")
        self.candidate_table, self._cand_offsets = merged(self._cand.categorical, "candidate")
        self.sequence_tables = {n: tf.Variable(weights[n], trainable=False, name=f"seq_{n}") for n in sequences}

        # Rows of W1 by input block: field j occupies rows [j*D, (j+1)*D), dense inputs follow.
        w1 = np.concatenate([t._dense[0].kernel.numpy() for t in towers], axis=1)  # noqa: SLF001
        b1 = np.concatenate([t._dense[0].bias.numpy() for t in towers], axis=0)  # noqa: SLF001
        rows = {n: w1[j * d:(j + 1) * d] for j, n in enumerate(fields)}
        dense_rows = w1[len(fields) * d:]
        self.w1_request = tf.Variable(np.concatenate([rows[n] for n in self._req.fields] or
                                                     [np.zeros((0, w1.shape[1]), np.float32)], 0),
                                      trainable=False, name="w1_request")
        self.w1_candidate = tf.Variable(np.concatenate([rows[n] for n in self._cand.fields] + [dense_rows], 0),
                                        trainable=False, name="w1_candidate")
        self.b1 = tf.Variable(b1, trainable=False, name="b1")
        self._width = int(towers[0]._dense[0].units)  # noqa: SLF001
        self.tower_layers: List[List[tf.Variable]] = []
        for t, tower in enumerate(towers):
            layers = list(tower._dense[1:]) + [tower._out]  # noqa: SLF001
            self.tower_layers.append([tf.Variable(v.numpy(), trainable=False, name=f"tower{t}_{i}")
                                      for i, layer in enumerate(layers) for v in (layer.kernel, layer.bias)])

    def _sequence(self, name: str, ids: tf.Tensor) -> tf.Tensor:
        """[B', D]: masked mean of the embeddings of ids [B', L] (0 = padding), as SharedEmbedding."""
        mask = tf.cast(ids > 0, tf.float32)[..., None]
        total = tf.reduce_sum(tf.gather(self.sequence_tables[name], ids) * mask, axis=1)
        return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def _side_input(self, side: _Side, table, offsets, cat_ids: tf.Tensor, seqs: Sequence[tf.Tensor]) -> List:
        """Embeddings of one side: cat_ids [B', F] (one gather), then each sequence [B', L] -> [B', D]."""
        parts = []
        if side.categorical:
            parts.append(tf.reshape(tf.gather(table, cat_ids + offsets), [-1, len(side.categorical) * self._dim]))
        parts.extend(self._sequence(n, x) for n, x in zip(side.sequences, seqs))
        return parts

    @staticmethod
    def _ids(features, names) -> tf.Tensor:
        return tf.concat([tf.reshape(tf.cast(features[n], tf.int64), [-1, 1]) for n in names], axis=1)

    def first_layer(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Pre-activation of every tower's first layer, side by side: [B, 4 * H1]."""
        dense = tf.concat([tf.reshape(tf.cast(features[n], tf.float32), [-1, 1]) for n in self._dense_names], 1)
        if self._tanh:
            dense = tf.tanh(dense)
        cand_ids = self._ids(features, self._cand.categorical) if self._cand.categorical else None
        cand_seqs = [tf.cast(features[n], tf.int64) for n in self._cand.sequences]
        x_cand = tf.concat(self._side_input(self._cand, self.candidate_table, self._cand_offsets, cand_ids,
                                            cand_seqs) + [dense], axis=1)
        h = tf.matmul(x_cand, self.w1_candidate)
        if self._req.fields:
            # One key row per impression: the request-level ids side by side, sequences widening it.
            n_cat = len(self._req.categorical)
            blocks = ([self._ids(features, self._req.categorical)] if n_cat else []) + \
                [tf.cast(features[n], tf.int64) for n in self._req.sequences]
            keys = tf.concat(blocks, axis=1) if len(blocks) > 1 else blocks[0]
            uniq, idx = tf.raw_ops.UniqueV2(x=keys, axis=tf.constant([0], tf.int64), out_idx=tf.int32)  # [U, K]
            seqs, start = [], n_cat
            for block in blocks[1 if n_cat else 0:]:
                width = tf.shape(block)[1]
                seqs.append(uniq[:, start:start + width])
                start = start + width
            x_req = self._side_input(self._req, self.request_table, self._req_offsets, uniq[:, :n_cat], seqs)
            per_request = tf.matmul(tf.concat(x_req, axis=1) if len(x_req) > 1 else x_req[0], self.w1_request)
            h = h + tf.gather(per_request, idx)                                                   # [B, 4 * H1]
        return tf.nn.bias_add(h, self.b1)

    def __call__(self, features: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        h1 = tf.nn.relu(self.first_layer(features))
        probs = []
        for t, weights in enumerate(self.tower_layers):
            z = h1[:, t * self._width:(t + 1) * self._width]
            for i in range(0, len(weights), 2):
                z = tf.nn.bias_add(tf.matmul(z, weights[i]), weights[i + 1])
                if i + 2 < len(weights):
                    z = tf.nn.relu(z)
            probs.append(tf.sigmoid(z))  # [B, 1]
        y1, y2, y3, y4 = probs
        cvr = (1.0 - y2) * y4 + y2 * y3  # ESM² Eqs. 1-4, as models.layers.ESM2Composition
        return {CTR: y1, CTAVR: y1 * y2, CVR: cvr, CTCVR: y1 * cvr}


def probe_features(model, batch: int = 64, seed: int = 0, seq_len: int = 6) -> Dict[str, tf.Tensor]:
    """Random transformed features within the model's cardinalities: categorical [B, 1], sequences [B, L]
    (with padding), dense [B, 1]. Rows come in groups of 8 sharing all but the first two categorical
    fields, so request-level sharing is exercised."""
    emb = model.embedding
    rng = np.random.default_rng(seed)
    out = {}
    for j, (name, card) in enumerate(emb.categorical.items()):
        ids = rng.integers(0, card, size=(batch, 1))
        if j >= 2:
            ids = np.repeat(ids[::8], 8, axis=0)[:batch]
        out[name] = tf.constant(ids, tf.int64)
    for name, card in getattr(emb, "sequences", {}).items():
        ids = rng.integers(1, card + 1, size=(batch, seq_len)) * (rng.random((batch, seq_len)) < 0.7)
        ids[0] = 0  # an empty history
        out[name] = tf.constant(np.repeat(ids[::8], 8, axis=0)[:batch], tf.int64)
    for name in emb.dense:
        out[name] = tf.constant(rng.normal(size=(batch, 1)).astype(np.float32))
    return out


def verify(graph: ESM2ScoringGraph, model, features: Mapping[str, tf.Tensor], atol: float = 1e-5) -> float:
    """Max |graph - model| over outputs on ``features``; raises UnsupportedModel above ``atol``."""
    want = model(dict(features), training=False)
    got = graph(features)
    worst = 0.0
    for name in got:
        diff = float(np.max(np.abs(np.reshape(got[name].numpy(), [-1]) - np.reshape(want[name].numpy(), [-1]))))
        worst = max(worst, diff)
        if not diff <= atol:
            raise UnsupportedModel(f"scoring graph output {name!r} differs from the Keras model by {diff:g}")
    return worst
