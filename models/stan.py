"""STAN: Stage-Adaptive Network (Cao et al., RecSys 2023; ../shared/papers/stan-stage-adaptive-multitask.txt).

    Backbone (Eqs. 1-4):   CGC/PLE extraction with task-specific and shared experts, one gate and tower per
                           task — the ``models.ple.PLE`` backbone, here on ESM²'s four towers and composition,
                           so STAN and PLE differ only by the stage-adaptive loss.
    Preference (Eqs. 7-9): ``UserPreference`` over the user-side field embeddings U [B, d1, D] -> y~^k per task k.
                           U: ``user_fields``, by default (``bind_to_contract``) the embedded fields of the schema's
                           user columns and derived user features *except* ``uf_rate_<label>_bucket`` for every
                           label: those buckets quantise Eq. 10's l^k, the very targets of Eq. 11, and with them in U
                           the head could fit L_s by copying an input. The main towers still embed them.
    Eq. 10-11:             L_s^k = mean_i (l_i^k - y~_i^k)^2, with l^k the user's running label mean over earlier
                           events (the leakage-safe ``pl_<label>`` columns of the preprocessing stage).
    Algorithm 1, Eq. 12:   per user and task a Beta(alpha, beta) state fed with y~ (``BetaStageState``), updated
                           only in ``train_step``; gamma^k ~ Beta(alpha_u^k, beta_u^k) per example, drawn after the
                           batch's update. One pass: each event (user, ``uf_count_raw`` = the user's number of
                           earlier events, read from the labels) updates the state once, with Algorithm 1's count
                           c_u = that position + 1; an event seen again in a later epoch (or a replayed step) is
                           skipped, so after any number of epochs a user with n training events has
                           alpha + beta = 2 + n (n + 1) / 2. Keyed on the event rather than reset per epoch, so it
                           holds under shuffling, tf.distribute (the global batch is all-gathered), mid-epoch resume
                           from a backup and steps_per_execution; it needs each user's training rows to be the
                           user's earliest (a time split or one keyed by user; see ``BetaStageState``).
    Eq. 13-14:             L = sum_k (gamma^k * L_t^k + L_s^k), L_t^k the entire-space log loss of task k
                           (ctr/click, ctavr/DAction, ctcvr/purchase), weighted per example.
    Ablation "STAN w/o Beta" (``use_beta=False``): gamma = y~ (no gradient through the weight).

Preset ``paper``: STAN's §4.1.3 (batch 2048, Adam with learning rate 1e-3 and epsilon 1e-6, embeddings of 128,
ReLU); the widths, which the paper leaves to a search under 1024 units per layer, are PLE's ``paper`` preset's.

The figures below were measured before issue #24 (a Beta state that added every event again in each epoch, and
a U holding the uf_rate buckets). Both fixes together, on 100k built-in rows (2 seeds, preset ``default``, 3
epochs), moved STAN's AUC from ctr 0.8180 / cvr 0.6696 / ctcvr 0.8868 to 0.8189 / 0.6801 / 0.8907, PLE being
0.8191 / 0.6596 / 0.8894 on the same data (README has the command and the separate effects are not measured).

Measured (README, 600k built-in rows, 3 seeds): the Beta state beats "w/o Beta" on users with few earlier
events in every task and seed (e.g. CVR 0.7734 vs 0.6974); STAN stays behind PLE overall, because the literal
Eq. 13 scales each task loss to about the task's positive rate; preset ``normalized`` (gamma over its batch
mean) closes most of that gap. With more events per user and item (600k rows, 6000 users, 600 items, 5 seeds)
both beat PLE on CTCVR in every seed (+0.0013, +0.0014) and trail it without lifecycle stages (the control
``--no-lifecycle-stages``: -0.0043, -0.0014); on clicks STAN stays behind PLE.
On a planted log of one-impression users whose purchases follow a taste of their own (the light test in
``tests/models/test_stan.py``), the Beta state beats "w/o Beta" on new users' CVR AUC by +0.08 to +0.28 (16 runs):
y~ is fitted to a running purchase rate of 0 for users without history, so "w/o Beta" gives their rows ~0 weight.
On the same log STAN beats PLE on new users' CVR by +0.119 on average (16 runs), and by +0.005 in the control
where new users buy as mature ones do. Most of that gain is the preference loss (Eq. 11) shaping the shared
user-side embeddings; the stage weights add the rest.

Serving: ``call`` is PLE's; the preference module and the Beta state are training-only. The Beta state lives
in non-trainable variables keyed by the user's vocabulary index, so checkpoints carry it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import tensorflow as tf

from models.keras import keras
from models.layers.stage import BetaStageState, UserPreference
from models.ple import PLE, PLEConfig
from models.tasks.ranking import EPSILON
from transforms.features import CLICK, DACTION, PURCHASE, UF_COUNT_RAW, bucket_id, pseudo_label, uf_rate

STAGE_LABELS = (CLICK, DACTION, PURCHASE)  # the labels of the three supervised tasks, in task order
# Each row's number of earlier events of its user (time order, from the schema's user_features): the event key of
# the Beta state's update, read from the labels (it is never a model input).
EVENT_POSITION = UF_COUNT_RAW


@dataclass(frozen=True)
class STANConfig(PLEConfig):
    use_beta: bool = True          # False: the paper's "STAN w/o Beta" ablation (gamma = y~)
    user_fields: Tuple[str, ...] = ()  # transformed user-side embedding fields forming U (set by the pipeline)
    user_index: str = "user_id_id"     # the feature whose id keys the Beta state
    w_stage: float = 1.0           # weight of L_s (Eq. 13 uses 1)
    normalize_gamma: bool = False  # divide gamma^k by its batch mean (keeps the loss scale); off = Eq. 13

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "user_fields", tuple(self.user_fields))
        if self.w_stage < 0:
            raise ValueError(f"STANConfig.w_stage must be >= 0, got {self.w_stage}")



PRESETS: Dict[str, STANConfig] = {
    "default": STANConfig(),
    # gamma^k divided by its batch mean: Eq. 13's weighting between users kept, the task losses' scale not
    # shrunk to the tasks' positive rates (~0.05 for clicks, ~0.002 for purchases with the literal Eq. 13).
    "normalized": STANConfig(normalize_gamma=True),
    # STAN §4.1.3: "we assign an embedding dimension of 128 to all methods", "we set the batch size to 2048",
    # Adam with "beta_1 = 0.9, beta_2 = 0.999, and epsilon = 1 x 10^-6" (beta_1, beta_2 are tf_keras' defaults),
    # "We set the learning rate at 0.001", ReLU everywhere (our experts and towers are ReLU MLPs). The paper
    # states no widths, numbers of experts or levels, or dropout, only that hidden units are searched under
    # "the same upper bound for the number of hidden units per layer at 1024": those are the widths of PLE's
    # ``paper`` preset (two levels of 1 + 2 experts of 256 units, towers 128-32), without dropout, which
    # the paper does not mention.
    "paper": STANConfig(hidden_units=(128, 32), num_levels=2, experts_per_task=1, num_shared_experts=2,
                        expert_units=(256,), dropout=0.0, embedding_dim=128, learning_rate=1e-3,
                        adam_epsilon=1e-6, batch_size=2048),
}
PRESETS_NO_BETA: Dict[str, STANConfig] = {k: STANConfig(**dict(v.to_dict(), use_beta=False)) for k, v in PRESETS.items()}


@keras.utils.register_keras_serializable(package="rankline")
class STAN(PLE):
    REQUIRED_LABELS = STAGE_LABELS + tuple(pseudo_label(l) for l in STAGE_LABELS) + (EVENT_POSITION,)
    CONFIG = STANConfig

    @classmethod
    def bind_to_contract(cls, config, contract, inputs):
        """Fills ``user_fields`` (U of Eq. 7) from the contract's user columns when not set, leaving out the
        quantised running label means ``uf_rate_<label>_bucket`` of every label: they are Eq. 10's
        pseudo-labels, the targets of the preference head (Eq. 11), which would otherwise learn to copy an
        input. The main towers keep them (the shared embedding holds every field). Explicit ``user_fields``
        are kept as given."""
        if config.user_fields:
            return config
        targets = {bucket_id(uf_rate(label)) for label in contract.labels.transformed}
        fields = tuple(f for f in contract.embedded_fields(contract.user_columns) if f in inputs and f not in targets)
        if not fields:
            raise ValueError(f"STAN needs user-side features; dataset {contract.name!r} declares none "
                             "(roles.user_columns) besides the pseudo-label buckets")
        return dataclasses.replace(config, user_fields=fields)

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (),
                 config: STANConfig | Dict | None = None, sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(categorical, dense, config, sequences, **kwargs)
        c = self.config
        fields = list(self.embedding.categorical) + list(self.embedding.sequences)  # field_embeddings order
        user_fields = list(c.user_fields) or [f for f in fields if f.startswith("user")]
        missing = [f for f in user_fields if f not in fields]
        if missing or not user_fields:
            raise ValueError(f"STAN: user field(s) {missing or '(none)'} are not embedded inputs; have {fields}")
        if c.user_index not in self.embedding.categorical:
            raise ValueError(f"STAN: user_index {c.user_index!r} is not a categorical input")
        self._user_pos = [fields.index(f) for f in user_fields]
        self.preference = UserPreference(len(user_fields), c.embedding_dim, len(STAGE_LABELS), name="preference")
        self.stage = BetaStageState(self.embedding.categorical[c.user_index], len(STAGE_LABELS), name="stage")

    def user_preferences(self, features) -> tf.Tensor:
        """y~ [B, K] (Eqs. 7-9) from the user-side field embeddings U [B, d1, D]."""
        u = tf.gather(self.embedding.field_embeddings(features), self._user_pos, axis=1)
        return self.preference(u)

    def loss_weights(self, features, y_tilde, training: bool, positions=None) -> tf.Tensor:
        """gamma [B, K]: Beta draws after the Algorithm 1 update with this batch's events (training;
        ``positions`` [B, 1], the rows' ``uf_count_raw``, key the update, see ``BetaStageState``), the Beta
        mean (evaluation), or y~ itself without the Beta state."""
        c = self.config
        if c.use_beta:
            users = features[c.user_index]
            if training:
                if positions is None:
                    raise ValueError(f"STAN: training needs each row's {EVENT_POSITION!r} (its user's number of "
                                     "earlier events, from the schema's user_features) among the labels: it keys "
                                     "the Beta state's update (Algorithm 1)")
                self.stage.update(users, y_tilde, positions)
                gamma = self.stage.sample(users)
            else:
                gamma = self.stage.mean(users)
        else:
            gamma = y_tilde
        gamma = tf.stop_gradient(gamma)
        if c.normalize_gamma:
            gamma = gamma / (tf.reduce_mean(gamma, axis=0, keepdims=True) + EPSILON)
        return gamma

    def compute_loss(self, features, labels, training: bool = False) -> tf.Tensor:
        c = self.config
        predictions = self(features, training=training)
        y_tilde = self.user_preferences(features)
        gamma = self.loss_weights(features, y_tilde, training, labels.get(EVENT_POSITION))
        total = 0.0
        for k, task in enumerate(self._tasks):
            task.compute_loss(labels, predictions)  # metrics (unweighted log loss, AUC)
            y = tf.reshape(tf.cast(labels[task.label], tf.float32), [-1])
            p = tf.clip_by_value(tf.reshape(predictions[task.output], [-1]), EPSILON, 1.0 - EPSILON)
            bce = -(y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))             # Eq. 14, per example
            l_t = tf.reduce_mean(gamma[:, k] * bce)
            target = tf.reshape(tf.cast(labels[pseudo_label(STAGE_LABELS[k])], tf.float32), [-1])
            l_s = tf.reduce_mean(tf.square(target - y_tilde[:, k]))                    # Eq. 11
            total += task.weight * l_t + c.w_stage * l_s                               # Eq. 13
        if self.losses:
            total += tf.add_n(self.losses)
        return total
