"""A serving-only forward pass of a trained ESM² that does the per-request work once per request.

Ranking requests score one user against N candidates: the user and context fields (user id, profile,
device, page, hour, ...) are the same in every row. The first layer of every tower is linear in the
concatenated field embeddings, so it splits exactly into a request-level part and a candidate-level part:

    x W1 + b1 = x_req W1_req + x_cand W1_cand + b1        (W1 = the four towers' kernels side by side)

``x_req W1_req + b1`` is computed once per distinct request-level id tuple in the batch (``UniqueV2`` over
the rows of the [B, R] id matrix); the candidate part and the deeper layers run per row, tower by tower.
When the batch is one request (the usual ranking call) the request part is the bias of each tower's fused
MatMul+BiasAdd+Relu; otherwise it is gathered back to the rows and added. Optionally, small-vocabulary
fields are pre-projected (``preproject_max_bytes``). Nothing is approximated: results equal the Keras
model's up to float32 summation order (checked at export, see ``serving.export``).

Ops used are core TensorFlow (UniqueV2, GatherV2, MatMul, BiasAdd, Relu, Sigmoid, If, ...), so stock TF
Serving runs the graph. Embedding tables and first-layer weights are ordinary variables saved in
``variables/``; the deeper tower layers (a few MB at paper size) are constants in ``saved_model.pb``, which
lets oneDNN keep their reordered layout between calls.
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


DEFAULT_PREPROJECT_MAX_BYTES = 256 * 2 ** 20
"""Default cap on the total size of the pre-projected tables (float32), see ``ESM2ScoringGraph``."""


class _Side:
    """One side (request or candidate) of the first layer.

    ``projected``: categorical fields whose first-layer contribution is pre-computed per id (one merged
    table of rows E_f[id] W1_f, ids shifted by per-field offsets; a gather-and-sum, no matmul);
    ``categorical``: the other categorical fields (one merged embedding table, then a matmul);
    ``sequences``: masked-mean sequence fields (their own tables, then the matmul).
    """

    def __init__(self, projected: Sequence[str], categorical: Sequence[str], sequences: Sequence[str]):
        self.projected, self.categorical, self.sequences = list(projected), list(categorical), list(sequences)

    @property
    def ids(self) -> List[str]:
        """The side's [B, 1] id inputs: projected fields, then the embedded ones."""
        return self.projected + self.categorical

    @property
    def embedded(self) -> List[str]:
        """Fields whose embedding enters the matmul, in W1 row order of this side."""
        return self.categorical + self.sequences


def plan_preprojection(candidate: Mapping[str, int], request: Mapping[str, int], width: int,
                       max_bytes: int) -> List[str]:
    """Categorical fields to pre-project: {name: vocabulary size} per side, ``width`` = 4 * H1.

    Candidate-side fields first (they are computed per row; request-side ones once per request), each
    side's smallest vocabularies first; a field is taken while the tables' total float32 size stays within
    ``max_bytes`` (a field that does not fit is skipped, smaller ones after it may still fit).
    """
    chosen, total = [], 0
    for side in (candidate, request):
        for name, vocab in sorted(side.items(), key=lambda kv: (kv[1], kv[0])):
            size = int(vocab) * int(width) * 4
            if total + size <= max_bytes:
                chosen.append(name)
                total += size
    return chosen


class ESM2ScoringGraph(tf.Module):
    """ESM² inference: transformed features -> {ctr, ctavr, cvr, ctcvr} each [B, 1].

    Inputs: categorical ids int64 [B, 1], sequence ids int64 [B, L] (0 = padding; embedded as the masked
    mean, as ``SharedEmbedding``), dense float32 [B, 1].
    ``request_fields``: categorical / sequence inputs that are usually equal across a request's rows (user
    and context fields). Any subset gives identical results; the choice only sets what is shared.

    Layout (what is fast on CPU, where [B, 4 * H1] temporaries cost more memory traffic than the matmuls):
    the first layer is computed per tower ([B, H1] each, no slicing of a wide tensor). When the batch holds
    one distinct request tuple (one user scored against N candidates), its request-level part plus the bias
    enter as the bias of one fused MatMul+BiasAdd+Relu per tower; otherwise the per-request rows are
    gathered back to the rows and added (a ``tf.cond``, both branches core ops).

    ``preproject_max_bytes``: pre-projected embeddings. The first layer is linear in the concatenated field
    embeddings, so field f contributes E_f[id] W1_f (W1_f = its rows of the towers' first kernels). For
    categorical fields with small vocabularies the tables T_f = E_f W1_f ([vocab_f, H1] per tower) are
    computed once here (float64, stored as float32) and those fields' first layer becomes a
    ``SparseSegmentSum`` (gather and sum, no matmul). Fields are chosen by ``plan_preprojection`` within
    this total size; 0 (the default: measured slower on CPU, see ``serving.bench_latency``) turns it off.
    """

    def __init__(self, model, request_fields: Sequence[str], preproject_max_bytes: int = 0):
        super().__init__(name="esm2_scoring_graph")
        emb, towers = _structure(model)
        d = self._dim = int(emb.embedding_dim)
        self._tanh = emb.dense_activation == "tanh"
        categorical, sequences = list(emb.categorical), list(getattr(emb, "sequences", {}))
        fields = categorical + sequences  # W1 row blocks, in SharedEmbedding's order
        self._dense_names = list(emb.dense)
        width = self._width = int(towers[0]._dense[0].units)  # noqa: SLF001
        wanted = set(request_fields)
        layers = dict(emb._tables, **getattr(emb, "_seq_tables", {}))  # noqa: SLF001
        weights = {n: layers[n].embeddings.numpy() for n in fields}
        # Rows of W1 by input block: field j occupies rows [j*D, (j+1)*D), dense inputs follow.
        w1 = np.concatenate([t._dense[0].kernel.numpy() for t in towers], axis=1)  # noqa: SLF001
        b1 = np.concatenate([t._dense[0].bias.numpy() for t in towers], axis=0)  # noqa: SLF001
        rows = {n: w1[j * d:(j + 1) * d] for j, n in enumerate(fields)}
        dense_rows = w1[len(fields) * d:]

        vocab = {n: weights[n].shape[0] for n in categorical}
        projected = set(plan_preprojection({n: vocab[n] for n in categorical if n not in wanted},
                                           {n: vocab[n] for n in categorical if n in wanted},
                                           w1.shape[1], int(preproject_max_bytes)))
        self.projected_fields = sorted(projected)

        def side(is_request: bool) -> _Side:
            cat = [n for n in categorical if (n in wanted) == is_request]
            return _Side([n for n in cat if n in projected], [n for n in cat if n not in projected],
                         [n for n in sequences if (n in wanted) == is_request])

        self._req, self._cand = side(True), side(False)

        def merged(names: Sequence[str], tables: Mapping[str, np.ndarray], name: str):
            """(variable, offsets [1, F]) of the tables of ``names`` stacked; (None, None) for none."""
            if not names:
                return None, None
            sizes = [tables[n].shape[0] for n in names]
            offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
            table = np.concatenate([tables[n] for n in names], 0).astype(np.float32)
            return tf.Variable(table, trainable=False, name=name), tf.constant(offsets[None, :])

        def per_tower(matrix: np.ndarray | None, name: str) -> List[tf.Variable]:
            """Column blocks of a [K, 4 * H1] matrix, one variable per tower ([] for None)."""
            if matrix is None:
                return []
            return [tf.Variable(np.ascontiguousarray(matrix[:, t * width:(t + 1) * width], np.float32),
                                trainable=False, name=f"{name}_{t}") for t in range(len(towers))]

        projections = {n: (weights[n].astype(np.float64) @ rows[n].astype(np.float64)) for n in projected}
        self.request_projected, self._req_proj_offsets = merged(self._req.projected, projections, "request_projected")
        cand_proj = np.concatenate([projections[n] for n in self._cand.projected], 0) if self._cand.projected else None
        self.candidate_projected = per_tower(cand_proj, "candidate_projected")
        sizes = [vocab[n] for n in self._cand.projected]
        self._cand_proj_offsets = tf.constant(np.cumsum([0] + sizes[:-1]).astype(np.int64)[None, :])
        self.request_table, self._req_offsets = merged(self._req.categorical, weights, "request_table")
        self.candidate_table, self._cand_offsets = merged(self._cand.categorical, weights, "candidate_table")
        self.sequence_tables = {n: tf.Variable(weights[n], trainable=False, name=f"seq_{n}") for n in sequences}

        def w1_rows(names: Sequence[str], extra: Sequence[np.ndarray]) -> np.ndarray | None:
            blocks = [rows[n] for n in names] + [x for x in extra if x.shape[0]]
            return np.concatenate(blocks, 0) if blocks else None

        w1_req = w1_rows(self._req.embedded, [])
        self.w1_request = None if w1_req is None else tf.Variable(w1_req, trainable=False, name="w1_request")
        self.w1_candidate = per_tower(w1_rows(self._cand.embedded, [dense_rows]), "w1_candidate")
        self.b1 = tf.Variable(b1, trainable=False, name="b1")
        # The deeper layers' kernels and biases enter the graph as constants (numpy, embedded when traced):
        # oneDNN then reorders a kernel into its blocked layout once instead of on every call.
        self._tower_weights = tuple(
            tuple(np.array(v.numpy(), np.float32) for layer in list(tower._dense[1:]) + [tower._out]  # noqa: SLF001
                  for v in (layer.kernel, layer.bias))
            for tower in towers)

    @property
    def request_inputs(self) -> List[str]:
        """The inputs treated as request-level (shared once per distinct tuple in a batch)."""
        return self._req.ids + self._req.sequences

    def _sequence(self, name: str, ids: tf.Tensor) -> tf.Tensor:
        """[B', D]: masked mean of the embeddings of ids [B', L] (0 = padding), as SharedEmbedding."""
        mask = tf.cast(ids > 0, tf.float32)[..., None]
        total = tf.reduce_sum(tf.gather(self.sequence_tables[name], ids) * mask, axis=1)
        return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def _embedded(self, side: _Side, table, offsets, cat_ids, seqs: Sequence[tf.Tensor], dense=None):
        """The side's matmul input [B', C * D + S * D (+ N)], or None: cat_ids [B', C] of
        ``side.categorical``, seqs [B', L] per sequence field, dense [B', N] (candidate side)."""
        inputs = []
        if side.categorical:
            inputs.append(tf.reshape(tf.gather(table, cat_ids + offsets), [-1, len(side.categorical) * self._dim]))
        inputs.extend(self._sequence(n, x) for n, x in zip(side.sequences, seqs))
        if dense is not None:
            inputs.append(dense)
        if not inputs:
            return None
        return tf.concat(inputs, axis=1) if len(inputs) > 1 else inputs[0]

    @staticmethod
    def _segments(ids: tf.Tensor):
        """(flat ids [B' * F], segment ids [B' * F], B') of ids [B', F]: row i sums its F entries."""
        shape = tf.shape(ids, out_type=tf.int32)
        segments = tf.reshape(tf.broadcast_to(tf.range(shape[0])[:, None], shape), [-1])
        return tf.reshape(ids, [-1]), segments, shape[0]

    @staticmethod
    def _ids(features, names) -> tf.Tensor:
        return tf.concat([tf.reshape(tf.cast(features[n], tf.int64), [-1, 1]) for n in names], axis=1)

    def _per_request(self, features: Mapping[str, tf.Tensor]):
        """(per_request [U, 4 * H1] = request-level part + b1, idx [B] row -> its request), U = distinct
        request-level id tuples in the batch; None when there are no request-level fields."""
        r = self._req
        if not (r.ids or r.sequences):
            return None
        # One key row per impression: the request-level ids side by side, sequences widening it.
        n_proj, n_cat = len(r.projected), len(r.ids)
        blocks = ([self._ids(features, r.ids)] if n_cat else []) + [tf.cast(features[n], tf.int64) for n in r.sequences]
        keys = tf.concat(blocks, axis=1) if len(blocks) > 1 else blocks[0]
        uniq, idx = tf.raw_ops.UniqueV2(x=keys, axis=tf.constant([0], tf.int64), out_idx=tf.int32)  # [U, K]
        seqs, start = [], n_cat
        for block in blocks[1 if n_cat else 0:]:
            width = tf.shape(block)[1]
            seqs.append(uniq[:, start:start + width])
            start = start + width
        h = self.b1[None, :]
        if n_proj:
            flat, segments, n = self._segments(uniq[:, :n_proj] + self._req_proj_offsets)
            h = h + tf.sparse.segment_sum(self.request_projected, flat, segments, num_segments=n)
        x = self._embedded(r, self.request_table, self._req_offsets, uniq[:, n_proj:n_cat], seqs)
        if x is not None:
            h = h + tf.matmul(x, self.w1_request)
        return tf.broadcast_to(h, [tf.shape(uniq)[0], tf.shape(h)[1]]), idx

    def first_layer(self, features: Mapping[str, tf.Tensor]) -> List[tf.Tensor]:
        """Every tower's first hidden layer (after the ReLU): a list of [B, H1]."""
        dense = None
        if self._dense_names:
            dense = tf.concat([tf.reshape(tf.cast(features[n], tf.float32), [-1, 1]) for n in self._dense_names], 1)
            if self._tanh:
                dense = tf.tanh(dense)
        c = self._cand
        x = self._embedded(c, self.candidate_table, self._cand_offsets,
                           self._ids(features, c.categorical) if c.categorical else None,
                           [tf.cast(features[n], tf.int64) for n in c.sequences], dense)
        proj = self._segments(self._ids(features, c.projected) + self._cand_proj_offsets) if c.projected else None
        some = next(iter(features.values()))
        batch = tf.shape(some)[0]
        w = self._width

        def tower(t: int, bias, shared):
            """Tower t's first layer: bias [H1] (broadcast over rows) and / or shared [B, H1] added."""
            z = tf.matmul(x, self.w1_candidate[t]) if x is not None else tf.zeros([batch, w])
            if bias is not None:
                z = tf.nn.bias_add(z, bias)
            if proj is not None:
                z = z + tf.sparse.segment_sum(self.candidate_projected[t], proj[0], proj[1], num_segments=proj[2])
            if shared is not None:
                z = z + shared
            return tf.nn.relu(z)

        towers = range(len(self._tower_weights))
        request = self._per_request(features)
        if request is None:
            return [tower(t, self.b1[t * w:(t + 1) * w], None) for t in towers]
        per_request, idx = request

        def one_request():  # the request-level part is the same in every row: a bias
            return [tower(t, per_request[0, t * w:(t + 1) * w], None) for t in towers]

        def many_requests():
            return [tower(t, None, tf.gather(per_request[:, t * w:(t + 1) * w], idx)) for t in towers]

        return tf.cond(tf.shape(per_request)[0] == 1, one_request, many_requests)

    def __call__(self, features: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        probs = []
        for z, weights in zip(self.first_layer(features), self._tower_weights):
            for i in range(0, len(weights), 2):
                z = tf.nn.bias_add(tf.matmul(z, tf.constant(weights[i])), tf.constant(weights[i + 1]))
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
    """Max |graph - model| over outputs; raises UnsupportedModel above ``atol``.

    Checked on ``features`` as given and on a copy whose request-level inputs are row 0's in every row (one
    request: the graph's other branch), so both paths of the graph are compared with the model."""
    one_request = dict(features)
    for name in graph.request_inputs:
        first = features[name][:1]
        one_request[name] = tf.repeat(first, tf.shape(features[name])[0], axis=0)
    worst = 0.0
    for feats in (features, one_request):
        want = model(dict(feats), training=False)
        got = graph(feats)
        for name in got:
            diff = float(np.max(np.abs(np.reshape(got[name].numpy(), [-1]) - np.reshape(want[name].numpy(), [-1]))))
            worst = max(worst, diff)
            if not diff <= atol:
                raise UnsupportedModel(f"scoring graph output {name!r} differs from the Keras model by {diff:g}")
    return worst
