"""STAN: Stage-Adaptive Network (Cao et al., RecSys 2023; ../shared/papers/stan-stage-adaptive-multitask.txt).

    Backbone (Eqs. 1-4):   CGC/PLE extraction with task-specific and shared experts, one gate and tower per
                           task — the ``models.ple.PLE`` backbone, here on ESM²'s four towers and composition,
                           so STAN and PLE differ only by the stage-adaptive loss.
    Preference (Eqs. 7-9): ``UserPreference`` over the user-side field embeddings U -> y~^k per task k.
    Eq. 10-11:             L_s^k = mean_i (l_i^k - y~_i^k)^2, with l^k the user's running label mean over earlier
                           events (the leakage-safe ``pl_<label>`` columns of the preprocessing stage).
    Algorithm 1, Eq. 12:   per user and task a Beta(alpha, beta) state fed with y~ (``BetaStageState``), updated
                           only in ``train_step``; gamma^k ~ Beta(alpha_u^k, beta_u^k) per example.
    Eq. 13-14:             L = sum_k (gamma^k * L_t^k + L_s^k), L_t^k the entire-space log loss of task k
                           (ctr/click, ctavr/DAction, ctcvr/purchase), weighted per example.
    Ablation "STAN w/o Beta" (``use_beta=False``): gamma = y~ (no gradient through the weight).

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
from transforms.features import CLICK, DACTION, PURCHASE, pseudo_label

STAGE_LABELS = (CLICK, DACTION, PURCHASE)  # the labels of the three supervised tasks, in task order


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
    "paper": STANConfig(hidden_units=(128, 32), num_levels=2, experts_per_task=1, num_shared_experts=2,
                        expert_units=(256,), dropout=0.5, learning_rate=5e-4, batch_size=1000),
}
PRESETS_NO_BETA: Dict[str, STANConfig] = {k: STANConfig(**dict(v.to_dict(), use_beta=False)) for k, v in PRESETS.items()}


@keras.utils.register_keras_serializable(package="rankline")
class STAN(PLE):
    REQUIRED_LABELS = STAGE_LABELS + tuple(pseudo_label(l) for l in STAGE_LABELS)
    CONFIG = STANConfig

    @classmethod
    def bind_to_contract(cls, config, contract, inputs):
        """Fills ``user_fields`` (U of Eq. 7) from the contract's user columns when not set."""
        if config.user_fields:
            return config
        fields = tuple(f for f in contract.embedded_fields(contract.user_columns) if f in inputs)
        if not fields:
            raise ValueError(f"STAN needs user-side features; dataset {contract.name!r} declares none "
                             "(roles.user_columns)")
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

    def loss_weights(self, features, y_tilde, training: bool) -> tf.Tensor:
        """gamma [B, K]: Beta draws after the Algorithm 1 update (training), the Beta mean (evaluation), or
        y~ itself without the Beta state."""
        c = self.config
        if c.use_beta:
            users = features[c.user_index]
            if training:
                self.stage.update(users, y_tilde)
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
        gamma = self.loss_weights(features, y_tilde, training)
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
