"""USSR: universal to segmentation-specific representation via bipartite neural interaction (Tan et al.,
SIGIR-AP 2024; ../shared/papers/ussr-user-segmentation-bipartite-interaction.txt).

Universal representation (§3.2, ``models.layers.mixture``):
    h = AutoInt(fields(x))                                   encoder, [B, N]   (``models.layers.autoint``)
    q(c | x) = softmax(W_c MLP_c(h))                         cluster posterior, [B, K]
    q(z | x, c = k) = N(mu_k(h), diag sigma_k^2(h))          one Gaussian head per cluster, [B, K, Z]
    z~_k = mu_k + sigma_k * eps                              reparameterised, training only (serving: z_k = mu_k)
    p(z | c = k) = N(mu_z(k), diag sigma_z^2(k))             learnable priors; p(c) = uniform 1/K
    p(y | z)                                                 one universal decoder (MLP) applied to every z~_k
    Eq. 3:  L_ib = sum_k q(c=k|x) [log p(y|z~_k) - KL(q(z|x,c=k) || p(z|c=k))] - KL(q(c|x) || p(c))
Segmentation-specific representation (§3.3, ``models.layers.bipartite``):
    u_m                                                      segment embeddings, [M, Du]
    Eqs. 4-6: h^_m = sum_k e_{k,m} f^_e(z_k || u_m)          bipartite interaction, [B, M, H]
    y^_m = sigmoid(f^_{v,m}(h^_m))                           one decoder per segment; ctr = y^_{s(x)}
Loss (``compute_loss``, never in ``call``):
    w_ctr * CE(click, ctr) + w_ib * ( sum_k q_k [CE(click, p(y|z~_k)) + beta KL_k] + beta KL_c )
    = w_ctr * CE - w_ib * L_ib for beta = 1 (Eq. 3); beta < 1 is the Lagrange multiplier of Eq. 2.
    The default is beta = 1e-3, NOT Eq. 3 as printed (which has no weight on its KL terms; the ``paper`` preset
    has beta = 1). Eq. 3 bounds Eq. 2, whose beta weights the compression term I(z, x), i.e. the KL terms of the
    bound; Eq. 3 prints them unweighted. On the built-in data beta = 1 is far worse (2 epochs). Measured
    (``python -m pipeline.benchmark --models ussr,ussr:paper --rows 100000 --seeds 3 --epochs 2``, CPU):
    CTR AUC 0.8194 +- 0.0005 (beta = 1e-3) against 0.6789 +- 0.0055 (beta = 1), worst-segment AUC (premium,
    ~2,000 eval rows) 0.7321 +- 0.0076 against 0.6569 +- 0.0387. The figures below are all at beta = 1e-3.

Outputs: ``ctr`` [B, 1] (the row's segment decoder) and ``ctr_universal`` [B, 1] = sum_k q_k p(y | z_k).

Expansion (§3.4, ``expand``): a new segment M+1 takes over a transformed segment id (e.g. the vocabulary's OOV
bucket that the new segment's rows fall in) and gets its own u_{M+1} and decoder f^_{v,M+1}; its h^_{M+1} comes
from the bipartite interaction over all M+1 segments, while the original segments keep reading the interaction
over their own M ("storing h^_m", §3.4), so their predictions stay bit-identical. Only the new parameters train.
A new cluster K+1 copies the head, prior and posterior logit of l* = argmax_l sum_{x in D_new} q(c=l|x) (Eq. 8)
and trains those with L_ed (Eq. 7) on D_new.

Measured (``python -m pipeline.benchmark --models ussr,autoint,autoint:wide --seeds 5 --rows 600000 --epochs 2``,
default presets, CPU; README): worst-segment AUC (b2b, ~5,000 eval rows) 0.7769 +- 0.0065 against AutoInt's
0.7608 +- 0.0036 (5 of 5 seeds), but against ``autoint:wide`` (AutoInt at USSR's ~410k parameters outside the
embeddings) 0.7683 +- 0.0069, a lead of +0.0086 inside the spreads; on a second data seed (``--seed 1``) USSR is
level with both. At 100k rows the difference was within noise. With a planted segment-specific taste
(``--segment-taste 2``, 3 seeds) the worst segment is level too (0.8760 against 0.8710 / 0.8736) and
``autoint:wide`` leads overall (0.9397 against 0.9353). Where a 5% segment reverses the shared taste (the light
test in ``tests/models/test_ussr.py``, 30 runs) USSR's worst segment is 0.903 +- 0.013 against the plain AutoInt's
0.749 +- 0.127 and 0.881 +- 0.024 at USSR's width: the per-segment decoders make it reliable on that segment.
On the built-in data with ``--contrary-segment`` (b2b reversing the shared affinity and item quality) all three
are level on b2b at 200k rows (0.7624 / 0.7592 / 0.7637) and at 60k rows (0.6606 / 0.6689 / 0.6707); with each
model at its best epoch (``--learning-rate 0.00025``, 200k rows) USSR is behind (0.7582 / 0.7603 / 0.7623).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from models.autoint import AutoIntConfig, AutoIntFields
from models.base import MultiTaskModel
from models.keras import keras
from models.layers.bipartite import BipartiteInteraction, SegmentEmbedding
from models.layers.mixture import GaussianHeads, GaussianPrior, categorical_kl, gaussian_kl, reparameterize
from models.layers.mlp import MLP
from models.tasks import BinaryTask
from transforms.features import CLICK, CTR

CTR_UNIVERSAL = "ctr_universal"
OBJECTIVES = ("full", "new_cluster")


@dataclass(frozen=True)
class USSRConfig(AutoIntConfig):
    """USSR on top of the AutoInt encoder fields.

    ``num_clusters`` K, ``latent_dim`` Z, ``cluster_units`` (MLP of q(c|x)), ``interaction_units`` H (f_e, f_v,
    f_s, f^_e), ``segment_dim`` Du, ``hidden_units`` (each decoder: the universal p(y|z) and the M segment
    decoders), ``beta`` (weight of both KL terms; 1 = Eq. 3 as printed, the ``paper`` preset; the default 1e-3 is
    Eq. 2's Lagrange multiplier, far better on the built-in data: module docstring), ``w_ib`` (weight of the
    bottleneck objective).
    ``segment_feature``: the transformed segment input (filled by ``bind_to_contract``); its cardinality is M.
    ``added_segments`` / ``added_segment_ids`` / ``added_clusters``: what §3.4 expansion added (see ``expand``).
    ``shared_decoder``: one decoder f^_v on every h^_m instead of one f^_{v,m} per segment (§3.3: "one vortex
    decoder or M decoders"; the paper recommends M, the default). An added segment then trains only u_{M+1}.
    """

    num_clusters: int = 4
    latent_dim: int = 16
    cluster_units: Tuple[int, ...] = (64,)
    interaction_units: int = 32
    segment_dim: int = 8
    beta: float = 1e-3  # not Eq. 3's 1 (see the module docstring for both measured)
    w_ib: float = 1.0
    segment_feature: str = ""
    added_segments: Tuple[str, ...] = ()
    added_segment_ids: Tuple[int, ...] = ()
    added_clusters: int = 0
    shared_decoder: bool = False  # one vertex decoder f^_v for all segments (§3.3 allows one or M)

    TUPLE_FIELDS: ClassVar[Tuple[str, ...]] = ("hidden_units", "cluster_units")
    POSITIVE_INT_FIELDS: ClassVar[Tuple[str, ...]] = AutoIntConfig.POSITIVE_INT_FIELDS + (
        "num_clusters", "latent_dim", "interaction_units", "segment_dim")

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "added_segments", tuple(str(s) for s in self.added_segments))
        object.__setattr__(self, "added_segment_ids", tuple(int(i) for i in self.added_segment_ids))
        if self.beta < 0 or self.w_ib < 0:
            raise ValueError(f"USSRConfig.beta and w_ib must be >= 0, got {self.beta}, {self.w_ib}")
        if self.added_clusters < 0:
            raise ValueError(f"USSRConfig.added_clusters must be >= 0, got {self.added_clusters}")
        if len(self.added_segments) != len(self.added_segment_ids):
            raise ValueError("USSRConfig.added_segments and added_segment_ids must have the same length, got "
                             f"{self.added_segments} and {self.added_segment_ids}")
        if len(set(self.added_segment_ids)) != len(self.added_segment_ids) or min(self.added_segment_ids,
                                                                                   default=0) < 0:
            raise ValueError(f"USSRConfig.added_segment_ids must be distinct ids >= 0, got {self.added_segment_ids}")
        if len(set(self.added_segments)) != len(self.added_segments):
            raise ValueError(f"USSRConfig.added_segments has duplicate names: {self.added_segments}")


PRESETS: Dict[str, USSRConfig] = {
    "default": USSRConfig(),
    # Eq. 3 exactly (beta = 1).
    "paper": USSRConfig(beta=1.0),
}


@keras.utils.register_keras_serializable(package="rankline")
class USSR(AutoIntFields, MultiTaskModel):
    """Inputs: dict of transformed features ([B, 1]; sequences [B, L]). Outputs: {ctr, ctr_universal} [B, 1].

    ``forward(features, training)`` returns every intermediate (posterior logits, Gaussians, samples, the
    bipartite interaction, per-segment logits) for the loss and for tests; ``call`` keeps the two outputs.
    """

    REQUIRED_LABELS = (CLICK,)
    CONFIG = USSRConfig

    @classmethod
    def bind_to_contract(cls, config, contract, inputs):
        """Sets ``segment_feature`` to the transformed field of the contract's segment column (roles.segment)."""
        if config.segment_feature:
            if config.segment_feature not in inputs:
                raise ValueError(f"USSR: segment_feature {config.segment_feature!r} is not a model input")
            return config
        if not contract.segment:
            raise ValueError(f"USSR needs a user-segment column; dataset {contract.name!r} declares none "
                             "(roles.segment)")
        fields = [f for f in contract.embedded_fields((contract.segment,)) if f in inputs]
        if not fields or fields[0].endswith("_seq"):
            raise ValueError(f"USSR: segment column {contract.segment!r} of dataset {contract.name!r} is not a "
                             "categorical model input")
        return dataclasses.replace(config, segment_feature=fields[0])

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (),
                 config: USSRConfig | Dict | None = None, sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = c = USSRConfig.coerce(config)
        if not c.segment_feature:
            raise ValueError("USSR: config.segment_feature is not set (bind_to_contract fills it from the schema)")
        if c.segment_feature not in categorical:
            raise ValueError(f"USSR: segment_feature {c.segment_feature!r} is not a categorical input; "
                             f"have {sorted(categorical)}")
        self.base_segments = int(categorical[c.segment_feature])                 # M0: the segment id space
        bad = [i for i in c.added_segment_ids if i >= self.base_segments]
        if bad:
            raise ValueError(f"USSR: added_segment_ids {bad} outside the segment ids [0, {self.base_segments})")
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        self.build_autoint(dense)
        K0, Z = c.num_clusters, c.latent_dim
        # q(c|x): MLP_c then one logit per cluster (an added cluster gets its own logit unit).
        self.cluster_mlp = MLP(c.cluster_units, name="cluster_mlp")
        self.cluster_logits = keras.layers.Dense(K0, name="cluster_logits")
        self.added_cluster_logits = [keras.layers.Dense(1, name=f"cluster_logits_added_{i}")
                                     for i in range(c.added_clusters)]
        self.heads = GaussianHeads(K0, Z, name="heads")
        self.added_heads = [GaussianHeads(1, Z, name=f"heads_added_{i}") for i in range(c.added_clusters)]
        self.prior = GaussianPrior(K0, Z, name="prior")
        self.added_priors = [GaussianPrior(1, Z, name=f"prior_added_{i}") for i in range(c.added_clusters)]
        self.universal_decoder = self.tower("universal_decoder")                # p(y | z)
        self.segments = SegmentEmbedding(self.base_segments, c.segment_dim, name="segments")
        self.added_segment_embeddings = [SegmentEmbedding(1, c.segment_dim, name=f"segments_added_{i}")
                                         for i in range(len(c.added_segments))]
        self.bipartite = BipartiteInteraction(c.interaction_units, name="bipartite")
        self.decoders = ([self.tower("decoder")] if c.shared_decoder                     # f^_v
                         else [self.tower(f"decoder_{m}") for m in range(self.num_segments)])  # f^_{v,m}
        self._tasks.append(BinaryTask(CTR, CLICK, c.w_ctr))
        self.objective = "full"

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return self.config.num_clusters + self.config.added_clusters

    @property
    def num_segments(self) -> int:
        return self.base_segments + len(self.config.added_segments)

    @property
    def output_names_(self):
        return (CTR, CTR_UNIVERSAL)

    # ---- pieces ------------------------------------------------------------------------------------------
    def posterior_logits(self, h, training=None) -> tf.Tensor:
        """Logits of q(c | x) [B, K]."""
        hidden = self.cluster_mlp(h, training=training)
        return tf.concat([self.cluster_logits(hidden)] + [d(hidden) for d in self.added_cluster_logits], axis=1)

    def gaussians(self, h):
        """q(z | x, c = k): (mu, logvar), each [B, K, Z]."""
        parts = [self.heads(h)] + [head(h) for head in self.added_heads]
        return tf.concat([p[0] for p in parts], axis=1), tf.concat([p[1] for p in parts], axis=1)

    def priors(self):
        """p(z | c = k): (mu, logvar), each [K, Z]."""
        parts = [self.prior.params()] + [p.params() for p in self.added_priors]
        return tf.concat([p[0] for p in parts], axis=0), tf.concat([p[1] for p in parts], axis=0)

    def segment_table(self) -> tf.Tensor:
        """u [M, Du]: the original segments (one per segment id), then the added ones."""
        return tf.concat([self.segments.params()] + [s.params() for s in self.added_segment_embeddings], axis=0)

    def segment_index(self, features) -> tf.Tensor:
        """Decoder index [B] of each row: its segment id, or M0 + i for the id taken over by added segment i."""
        ids = tf.reshape(tf.cast(features[self.config.segment_feature], tf.int32), [-1])
        ids = tf.clip_by_value(ids, 0, self.base_segments - 1)
        for i, taken in enumerate(self.config.added_segment_ids):
            ids = tf.where(ids == taken, self.base_segments + i, ids)
        return ids

    def segment_representations(self, z) -> tf.Tensor:
        """h^ [B, M, H]: the original segments from the interaction over themselves, added segment i from the
        interaction over the first M0 + i + 1 segments (§3.4)."""
        u = self.segment_table()
        parts = [self.bipartite(z, u[:self.base_segments])]
        for i in range(len(self.config.added_segments)):
            n = self.base_segments + i + 1
            parts.append(self.bipartite(z, u[:n])[:, n - 1:n, :])
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def forward(self, features, training=None) -> Dict[str, tf.Tensor]:
        """All intermediates: h, q_logits [B,K], mu/logvar/z [B,K,Z], universal_logits [B,K], h_hat [B,M,H],
        segment_logits [B,M], segment_index [B], logit [B,1]."""
        h = self.encode(features)
        q_logits = self.posterior_logits(h, training=training)
        mu, logvar = self.gaussians(h)
        z = reparameterize(mu, logvar, training)
        universal_logits = tf.squeeze(self.universal_decoder(z, training=training), axis=-1)
        h_hat = self.segment_representations(z)
        if self.config.shared_decoder:
            segment_logits = tf.squeeze(self.decoders[0](h_hat, training=training), axis=-1)
        else:
            segment_logits = tf.concat([dec(h_hat[:, m, :], training=training) for m, dec in enumerate(self.decoders)],
                                       axis=1)
        index = self.segment_index(features)
        logit = tf.gather(segment_logits, index[:, None], batch_dims=1)
        return {"h": h, "q_logits": q_logits, "mu": mu, "logvar": logvar, "z": z,
                "universal_logits": universal_logits, "h_hat": h_hat, "segment_logits": segment_logits,
                "segment_index": index, "logit": logit}

    @staticmethod
    def outputs_from(out) -> Dict[str, tf.Tensor]:
        q = tf.nn.softmax(out["q_logits"], axis=-1)
        return {CTR: tf.sigmoid(out["logit"]),
                CTR_UNIVERSAL: tf.reduce_sum(q * tf.sigmoid(out["universal_logits"]), axis=1, keepdims=True)}

    def call(self, features, training=None):
        return self.outputs_from(self.forward(features, training=training))

    # ---- objective ---------------------------------------------------------------------------------------
    def bottleneck_terms(self, out, labels) -> Dict[str, tf.Tensor]:
        """Eq. 3's pieces per example: loglik [B,K] = log p(y|z~_k), kl_z [B,K], kl_c [B], q [B,K]."""
        y = tf.cast(tf.reshape(labels[CLICK], [-1, 1]), tf.float32)
        logits = out["universal_logits"]
        loglik = -tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.broadcast_to(y, tf.shape(logits)), logits=logits)
        mu_p, logvar_p = self.priors()
        kl_z = gaussian_kl(out["mu"], out["logvar"], mu_p, logvar_p)
        log_p_c = tf.fill([self.num_clusters], -math.log(self.num_clusters))
        kl_c = categorical_kl(out["q_logits"], log_p_c)
        return {"loglik": loglik, "kl_z": kl_z, "kl_c": kl_c, "q": tf.nn.softmax(out["q_logits"], axis=-1)}

    def elbo(self, out, labels, beta: float = 1.0) -> tf.Tensor:
        """L_ib per example [B] (Eq. 3; ``beta`` scales both KL terms)."""
        t = self.bottleneck_terms(out, labels)
        return tf.reduce_sum(t["q"] * (t["loglik"] - beta * t["kl_z"]), axis=1) - beta * t["kl_c"]

    def expansion_objective(self, out, labels, beta: float = 1.0) -> tf.Tensor:
        """L_ed per example [B] (Eq. 7) for the last cluster K+1:
        log q(c=K+1|x) + log p(y|z~_{K+1}) - KL(q(z|x,c=K+1) || p(z|c=K+1))."""
        t = self.bottleneck_terms(out, labels)
        log_q = tf.nn.log_softmax(out["q_logits"], axis=-1)
        return log_q[:, -1] + t["loglik"][:, -1] - beta * t["kl_z"][:, -1]

    def compute_loss(self, features, labels, training: bool = False) -> tf.Tensor:
        c = self.config
        out = self.forward(features, training=training)
        predictions = self.outputs_from(out)
        if self.objective == "new_cluster":
            self._tasks[0].compute_loss(labels, predictions)  # metrics only
            loss = -tf.reduce_mean(self.expansion_objective(out, labels, c.beta))
        else:
            loss = self._tasks[0].weight * self._tasks[0].compute_loss(labels, predictions)
            loss += c.w_ib * -tf.reduce_mean(self.elbo(out, labels, c.beta))
        if self.losses:
            loss += tf.add_n(self.losses)
        return loss

    # ---- expansion (§3.4) ----------------------------------------------------------------------------------
    def _layer_pairs(self, other: "USSR"):
        """(own layer, same layer in ``other``) for every layer both models have."""
        singles = ("embedding", "numeric", "encoder", "cluster_mlp", "cluster_logits", "heads", "prior",
                   "universal_decoder", "segments", "bipartite")
        pairs = [(getattr(self, n), getattr(other, n)) for n in singles if getattr(self, n) is not None]
        for name in ("added_cluster_logits", "added_heads", "added_priors", "added_segment_embeddings", "decoders"):
            pairs += list(zip(getattr(self, name), getattr(other, name)))
        return pairs

    def cluster_usage(self, dataset) -> np.ndarray:
        """sum_{x in dataset} q(c = l | x) [K] (Eq. 8's score); ``dataset`` yields (features, labels)."""
        total = np.zeros(self.num_clusters)
        for features, _ in dataset:
            q = tf.nn.softmax(self.posterior_logits(self.encode(features), training=False), axis=-1)
            total += tf.reduce_sum(q, axis=0).numpy()
        return total

    def bottleneck_loss_per_example(self, features, labels) -> tf.Tensor:
        """-L_ib [B] (Eq. 3 with the config's beta) without sampling: §3.4's score for the new-data buffer."""
        return -self.elbo(self.forward(features, training=False), labels, self.config.beta)

    def expand(self, add_segments: Sequence[Tuple[str, int]] = (), add_cluster_from: Optional[int] = None) -> "USSR":
        """A new model with segments and/or one cluster added, the old parameters copied and frozen.

        ``add_segments``: (name, transformed segment id it takes over) pairs. ``add_cluster_from``: l* of Eq. 8;
        the new cluster's head, prior and posterior logit start as copies of cluster l*'s, and the model's
        ``objective`` becomes Eq. 7's (train it on D_new). Only the new variables are trainable.
        """
        c = self.config
        if not add_segments and add_cluster_from is None:
            raise ValueError("USSR.expand: nothing to add")
        names = [n for n, _ in add_segments]
        clash = sorted(set(names) & set(c.added_segments))
        if clash:
            raise ValueError(f"USSR.expand: segment(s) {clash} were added before")
        if add_cluster_from is not None and not 0 <= add_cluster_from < self.num_clusters:
            raise ValueError(f"USSR.expand: cluster {add_cluster_from} not in [0, {self.num_clusters})")
        cfg = dataclasses.replace(
            c, added_segments=c.added_segments + tuple(names),
            added_segment_ids=c.added_segment_ids + tuple(int(i) for _, i in add_segments),
            added_clusters=c.added_clusters + (add_cluster_from is not None))
        new = type(self)(self.embedding.categorical, self.embedding.dense, cfg, self.embedding.sequences,
                         name=self.name)
        new(new.probe_features())
        self(self.probe_features())
        for old_layer, new_layer in self._layer_pairs(new):
            new_layer.set_weights(old_layer.get_weights())
        old_layers = {id(new_layer) for _, new_layer in self._layer_pairs(new)}
        if add_cluster_from is not None:
            self._init_cluster_from(new, add_cluster_from)
            new.objective = "new_cluster"
        for layer in new.layers:
            layer.trainable = id(layer) not in old_layers
        return new

    def _init_cluster_from(self, new: "USSR", l: int) -> None:
        """Eq. 8: the added cluster (the last) copies q(z|x, c=l), p(z|c=l) and l's logit unit of q(c|x)."""
        K0 = self.config.num_clusters
        mu_p, logvar_p = (t.numpy() for t in self.priors())
        new.added_priors[-1].set_weights([mu_p[l:l + 1], logvar_p[l:l + 1]])
        if l < K0:
            kernel, bias = self.heads.dense.get_weights()
            width = 2 * self.config.latent_dim
            new.added_heads[-1].set_weights([kernel[:, l * width:(l + 1) * width], bias[l * width:(l + 1) * width]])
            k, b = self.cluster_logits.get_weights()
            new.added_cluster_logits[-1].set_weights([k[:, l:l + 1], b[l:l + 1]])
        else:
            new.added_heads[-1].set_weights(self.added_heads[l - K0].get_weights())
            new.added_cluster_logits[-1].set_weights(self.added_cluster_logits[l - K0].get_weights())
