"""MUSENET: multi-scenario learning for repeat-aware recommendation (Xu et al., WSDM 2023).

Paper: ../shared/papers/musenet-multi-scenario-repeat-aware.txt. B = batch, F = embedded fields, D = embedding
width, N = F * D + dense inputs (the data-sample embedding x), P = projected width, K = scenarios.

    x:                   the shared embedding of the whole sample [p_u, B_u, b_t, o_u] -> [B, N].
    Scenario learner:    f_omega(x) [B, P]; Q_s(c | x) = softmax(-||f_omega(x) - c_k||^2) (Eq. 3); soft a = Q_s,
                         hard a = Gumbel-softmax (Eq. 7, tau = 0.1) while training, one-hot arg max (Eq. 4) after.
                         Not in the paper: by default (``normalize_scenario_input=True``) x is first standardised
                         per sample, (x - mean_j x_j) / sqrt(var_j x_j + 1e-6) over its N entries, so that
                         f_omega(x) starts at the N(0, 1) prototypes' scale; the ``paper`` preset turns it off.
    Repeat intention:    per scenario k, p_r^k from user + history + context only, s_r^k and s_e^k from all of
                         x; z_k = I[t in B_u] p_r s_r + (1 - I) (1 - p_r) s_e (Eq. 9). p_r's inputs leave out
                         L_A's own target, the user's running repeat ratio (``uf_repeat_ratio``, of which
                         ``pl_repeat_ratio`` is the raw value): with it, L_A would reduce to copying an input.
                         s_r and s_e still see it in x (the user profile [p_u, B_u] of §3.2.2).
    Prediction (§3.2.3): ctr = sigma(sum_k a_k z_k) (soft; hard: a is one-hot, so sigma(z_k) of the assigned k).
    Loss (Eq. 13):       L_T (Eq. 11) + D_KL(a || 1/K) (Eq. 12) + beta * L_A, L_A = mean_i (r_i - sum_k p_r^k a_ki)^2
                         (Eq. 10 without its sign typo: the squared error is minimised), r_i = the user's running
                         repeat ratio (``pl_repeat_ratio``). ``kl_term='marginal'`` replaces Eq. 12's per-sample
                         KL by KL(mean_i a_i || 1/K): Eq. 12 = I_a(X; C) + that marginal KL, so the per-sample
                         form also penalises the information the assignment carries about its sample, which is
                         what scenario recovery needs. Under a distribution strategy the mean is per replica.
    Optimisation:        each training step first moves the prototypes by Eq. 14 (alpha = 0.2) with Theta fixed,
                         then takes a gradient step on Theta (omega, embeddings, MLPs) with the new prototypes
                         fixed: the alternating scheme of Eq. 13. Prototypes receive no gradient.

Measured on the built-in data (README): Eq. 9 as printed costs ~0.003 CTR AUC against ``musenet_base``. With
its products in odds space (``repeat_combination='log_odds'``) and the context-only soft learner the model is
~0.001 ahead of ``musenet_base`` at 200k rows (4 of 5 seeds) and ~0.002 behind at 600k. The hard context-only
learner reaches NMI >= 0.5 with the hidden scenarios in 2 of 5 seeds (0.48 +- 0.13), 3 of 5 with k-means++
seeded prototypes (``prototype_init='kmeans++'``, 0.45 +- 0.21); the soft learner stays near uniform under
Eq. 12's KL at weight 1. With the marginal KL (presets ``*_marginal``) both learners recover the scenarios in
5 of 5 seeds at 200k rows (soft 0.70 +- 0.05, hard 0.67 +- 0.05; a ``--deterministic`` rerun 0.75 and 0.68),
at about the ablation's CTR AUC (+0.0004 to +0.0012 over two runs, a lead the deterministic run does not
hold beyond the spreads; s_r and s_e sharing one MLP, ``repeat_scorers='shared'``, is the best variant). With
more events per user and item (600k rows, 6000 users, 600 items) the ablation leads every variant (by 0.0015
the shared one): the data has no scenario effect that the ablation's MLP cannot read from the context, so
heads that each learn from one scenario's share of the data only cost. Stopped at each model's best epoch
(``--learning-rate 0.00025``, early stopping) soft MUSENET leads ``musenet_base`` at 200k rows in 5 of 5 seeds
(0.8869 vs 0.8845), but an MLP as large as its K x 3 towers (``musenet_base:wide``, or 1024-512-256: 0.8869)
gains as much: the lead is capacity, not the scenario and repeat modules. Where the scenario changes what a
user group wants (``--scenario-taste 2``: a scenario x group x category taste in the click logit) the scenario
module wins beyond capacity: 0.9061 +- 0.0011 against 0.8929 +- 0.0008 for ``musenet_base:wide`` and 0.8936 for
1024-512-256 (200k rows, 5 seeds, every seed), kept by w/o M2 (0.9058) and lost by w/o M1 (0.8900).
The figures above were measured while p_r's head still saw ``uf_repeat_ratio``. Leaving it out (100k rows,
2 seeds, 2 epochs, one run each): ``musenet`` 0.8192 +- 0.0000 -> 0.8222 +- 0.0028 CTR AUC, its eval
D_KL + beta L_A 0.0027 -> 0.0090 (L_A no longer copies an input); ``musenet:context_log_odds_pp_marginal``
0.8309 +- 0.0012 -> 0.8270 +- 0.0004, NMI 0.74 -> 0.66.

Preset ``paper``: the values the paper states, and nothing it does not state. §4.1 Implementations: "The
learning rate is set to 0.001 with Adam optimizer. The hyperparameters K and β in Eq. (8) and Eq. (13) are set
to 4 and 0.5 by default, respectively." §3.2.1: "We set τ to 0.1 by default." §3.2.4: "Here, we fix α to 0.2 by
default." Eq. 13 weighs D_KL by 1; Eqs. 9 and 12 as printed, s_r and s_e two MLPs (§3.2.2), x the whole sample
(§3.1.1: "x is the embedding of data sample x"), the soft version (Table 2's best). No per-sample standardisation
of x and no dropout: the paper states neither. It does not give the tower widths, the embedding width D, the
projection width P, the batch size, Adam's epsilon or how the prototypes start; those stay rankline's defaults
(128-64-32, 16, 16, 1000, 1e-7, N(0, 1) entries).

Outputs of ``call``: ``ctr`` [B, 1]; ``scenario`` [B, K] (Q_s, the scenario distribution) and
``repeat_intention`` [B, 1] (sum_k a_k p_r^k) when those modules are on. Ablation "w/o M1 & M2"
(``musenet_base``): ``use_scenarios=False, use_repeat=False`` -> ctr = sigma(MLP(x)). Single ablations "w/o M1"
(``musenet_no_scenarios``) and "w/o M2" (``musenet_no_repeat``), each with every preset of ``musenet``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import tensorflow as tf

from models.base import MultiTaskModel
from models.config import ModelConfig
from models.keras import keras
from models.layers.scenario import ASSIGNMENTS, PROTOTYPE_INITS, RepeatIntention, ScenarioLearner
from models.tasks import BinaryTask
from transforms.features import (CLICK, CTR, HOUR_ID, REPEAT_RATIO_LABEL, UF_IN_HISTORY, UF_REPEAT_RATIO, flag,
                                 zscore)

SCENARIO = "scenario"
KL_TERMS = ("sample", "marginal")
REPEAT_INTENTION = "repeat_intention"
# The raw column whose value is L_A's target r_i (``pl_repeat_ratio``, transforms.preprocessing): not an input of p_r.
AUX_TARGET_SOURCE = UF_REPEAT_RATIO


@dataclass(frozen=True)
class MUSENETConfig(ModelConfig):
    num_scenarios: int = 4            # K
    projection_dim: int = 16          # P, width of f_omega(x)
    assignment: str = "soft"          # "soft" (Eq. 3) or "hard" (Eqs. 4, 7)
    temperature: float = 0.1          # tau of the Gumbel-softmax (Eq. 7)
    prototype_momentum: float = 0.2   # alpha of Eq. 14
    prototype_init: str = "random"    # "random" N(0, 1) or "kmeans++" seeds from the first training batch
    beta: float = 0.5                 # weight of L_A (Eq. 13)
    w_kl: float = 1.0                 # weight of D_KL (Eq. 13 uses 1)
    # "sample": Eq. 12 as printed, mean_i KL(a_i || 1/K). "marginal": KL(mean_i a_i || 1/K), Eq. 12 less the
    # mutual information between sample and scenario that the per-sample form also charges (see ScenarioLearner).
    kl_term: str = "sample"
    # Not in the paper: standardise x per sample before f_omega (zero mean, unit variance over its N entries).
    normalize_scenario_input: bool = True
    use_scenarios: bool = True        # False: no scenario learner (K = 1, a = 1): ablation "w/o M1"
    use_repeat: bool = True           # False: z_k = s_k, one scorer per scenario: ablation "w/o M2"
    repeat_combination: str = "paper"  # Eq. 9 as printed ("paper") or its products in odds space ("log_odds")
    repeat_scorers: str = "separate"  # s_r, s_e: two MLPs (the paper) or one MLP with two outputs ("shared")
    # Transformed inputs (embedded fields or dense names) of the intention layer: user, history and context,
    # never the target item. Filled from the contract by ``bind_to_contract``.
    intention_inputs: Tuple[str, ...] = ()
    # What the scenario learner clusters: "all" = the whole sample x (the paper), "context" = only the context
    # o_u (neither user nor item side: device, page, hour, ...), filled into ``scenario_inputs`` by
    # ``bind_to_contract``; explicit ``scenario_inputs`` (transformed names) override both.
    scenario_side: str = "all"
    scenario_inputs: Tuple[str, ...] = ()
    in_history: str = flag(UF_IN_HISTORY)  # the 0/1 float input I[t in B_u]

    POSITIVE_INT_FIELDS = ("num_scenarios", "projection_dim")

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "intention_inputs", tuple(self.intention_inputs))
        object.__setattr__(self, "scenario_inputs", tuple(self.scenario_inputs))
        if self.scenario_side not in ("all", "context"):
            raise ValueError(f"MUSENETConfig.scenario_side must be 'all' or 'context', got {self.scenario_side!r}")
        if self.repeat_combination not in RepeatIntention.COMBINATIONS:
            raise ValueError(f"MUSENETConfig.repeat_combination must be one of {RepeatIntention.COMBINATIONS}, "
                             f"got {self.repeat_combination!r}")
        if self.kl_term not in KL_TERMS:
            raise ValueError(f"MUSENETConfig.kl_term must be one of {KL_TERMS}, got {self.kl_term!r}")
        if self.repeat_scorers not in RepeatIntention.SCORERS:
            raise ValueError(f"MUSENETConfig.repeat_scorers must be one of {RepeatIntention.SCORERS}, "
                             f"got {self.repeat_scorers!r}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"MUSENETConfig.assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if not self.temperature > 0:
            raise ValueError(f"MUSENETConfig.temperature must be > 0, got {self.temperature}")
        if self.prototype_init not in PROTOTYPE_INITS:
            raise ValueError(f"MUSENETConfig.prototype_init must be one of {PROTOTYPE_INITS}, "
                             f"got {self.prototype_init!r}")
        if not 0.0 <= self.prototype_momentum <= 1.0:
            raise ValueError(f"MUSENETConfig.prototype_momentum must be in [0, 1], got {self.prototype_momentum}")
        for f in ("beta", "w_kl"):
            if getattr(self, f) < 0:
                raise ValueError(f"MUSENETConfig.{f} must be >= 0, got {getattr(self, f)}")


PRESETS: Dict[str, MUSENETConfig] = {
    "default": MUSENETConfig(),
    "hard": MUSENETConfig(assignment="hard"),
    # The scenario learner clusters the context o_u only (device, page, hour on the built-in data).
    "context": MUSENETConfig(scenario_side="context"),
    "hard_context": MUSENETConfig(assignment="hard", scenario_side="context"),
    # Eq. 9's products taken in odds space: the repeat intention shifts the click logit instead of scaling it.
    "log_odds": MUSENETConfig(repeat_combination="log_odds"),
    "context_log_odds": MUSENETConfig(scenario_side="context", repeat_combination="log_odds"),
    "hard_context_log_odds": MUSENETConfig(assignment="hard", scenario_side="context", repeat_combination="log_odds"),
    # The same, with the prototypes placed by k-means++ on the first batch's projected samples.
    "context_log_odds_pp": MUSENETConfig(scenario_side="context", repeat_combination="log_odds",
                                         prototype_init="kmeans++"),
    "hard_context_log_odds_pp": MUSENETConfig(assignment="hard", scenario_side="context",
                                              repeat_combination="log_odds", prototype_init="kmeans++"),
    # The same with the KL of the batch's mean assignment to the prior instead of Eq. 12's per-sample KL (which also
    # charges the information an assignment carries about its sample): the scenarios are recovered (README).
    "context_log_odds_pp_marginal": MUSENETConfig(scenario_side="context", repeat_combination="log_odds",
                                                  prototype_init="kmeans++", kl_term="marginal"),
    "hard_context_log_odds_pp_marginal": MUSENETConfig(assignment="hard", scenario_side="context",
                                                       repeat_combination="log_odds", prototype_init="kmeans++",
                                                       kl_term="marginal"),
    # ... and with s_r, s_e as two outputs of one MLP per scenario, so that every impression trains its layers.
    "context_log_odds_pp_marginal_shared": MUSENETConfig(scenario_side="context", repeat_combination="log_odds",
                                                         prototype_init="kmeans++", kl_term="marginal",
                                                         repeat_scorers="shared"),
    # The paper's stated values only, quoted in the module docstring ("Preset paper").
    "paper": MUSENETConfig(learning_rate=1e-3, num_scenarios=4, beta=0.5, temperature=0.1, prototype_momentum=0.2,
                           w_kl=1.0, kl_term="sample", assignment="soft", repeat_combination="paper",
                           repeat_scorers="separate", scenario_side="all", normalize_scenario_input=False,
                           dropout=0.0),
    # Wider towers: ``musenet_base:wide`` has about as many parameters outside the embeddings as the K intention,
    # repeat and explore MLPs of the default width together (the ablation's capacity control).
    "wide": MUSENETConfig(hidden_units=(768, 384, 192)),
}
# Ablation "MUSENET w/o M1 & M2" (Table 3): no scenario learner, no repeat module: an embedding + MLP model.
PRESETS_BASE: Dict[str, MUSENETConfig] = {
    k: dataclasses.replace(v, use_scenarios=False, use_repeat=False) for k, v in PRESETS.items()}
# The single ablations of Table 3: "w/o M1" (no scenario learner: K = 1, a = 1) and "w/o M2" (no repeat module:
# one scorer per scenario).
PRESETS_NO_SCENARIOS: Dict[str, MUSENETConfig] = {
    k: dataclasses.replace(v, use_scenarios=False) for k, v in PRESETS.items()}
PRESETS_NO_REPEAT: Dict[str, MUSENETConfig] = {
    k: dataclasses.replace(v, use_repeat=False) for k, v in PRESETS.items()}


def _is_item_side(column: str, item_id) -> bool:
    """The candidate side, by the convention of ``serving.export.request_level_fields``."""
    return column == item_id or "item" in column


@keras.utils.register_keras_serializable(package="rankline")
class MUSENET(MultiTaskModel):
    REQUIRED_LABELS = (CLICK, REPEAT_RATIO_LABEL)
    CONFIG = MUSENETConfig

    @classmethod
    def bind_to_contract(cls, config, contract, inputs):
        """Fills ``intention_inputs`` with the user, history and context inputs (everything but the item side and
        ``uf_repeat_ratio``, the source of L_A's target) and checks that the dataset has the exact I[t in B_u]
        input. An explicit ``intention_inputs`` is kept as given."""
        if config.use_repeat and UF_IN_HISTORY not in contract.flags:
            raise ValueError(f"MUSENET needs the per-user features (uf_item_in_history); dataset "
                             f"{contract.name!r} has none (user_features in the schema)")
        columns = [f.name for f in contract.categorical + contract.numeric + contract.sequences]

        def inputs_of(cols):
            names = list(contract.embedded_fields(cols))
            names += [zscore(c) for c in cols if any(f.name == c for f in contract.numeric)]
            if contract.timestamp:
                names.append(HOUR_ID)
            return tuple(n for n in dict.fromkeys(names) if n in inputs)

        request_side = [c for c in columns if not _is_item_side(c, contract.item_id)]
        if config.use_repeat and not config.intention_inputs:
            # p_r's head never sees L_A's target (Eq. 10): pl_repeat_ratio is the raw uf_repeat_ratio.
            fields = inputs_of([c for c in request_side if c != AUX_TARGET_SOURCE])
            if not fields:
                raise ValueError(f"MUSENET needs user/history/context features; dataset {contract.name!r} has none")
            config = dataclasses.replace(config, intention_inputs=fields)
        if config.use_scenarios and config.scenario_side == "context" and not config.scenario_inputs:
            context = inputs_of([c for c in request_side if c not in contract.user_columns])
            if not context:
                raise ValueError(f"MUSENET scenario_side='context' needs context features; dataset "
                                 f"{contract.name!r} has none")
            config = dataclasses.replace(config, scenario_inputs=context)
        return config

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (),
                 config: MUSENETConfig | Dict | None = None, sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = MUSENETConfig.coerce(config)
        c = self.config
        self.embedding = self.shared_embedding(categorical, dense, sequences)
        fields = list(self.embedding.categorical) + list(self.embedding.sequences)  # field_embeddings order
        self._fields = fields
        self._intention = self._positions(c.intention_inputs, "intention_inputs") if c.use_repeat else ([], [])
        self._scenario = self._positions(c.scenario_inputs, "scenario_inputs") if c.scenario_inputs else None
        k = c.num_scenarios if c.use_scenarios else 1
        self.num_scenarios = k
        self.scenarios = (ScenarioLearner(k, c.projection_dim, c.assignment, c.temperature, c.prototype_momentum,
                                          c.normalize_scenario_input, prototype_init=c.prototype_init,
                                          name="scenario_learner")
                          if c.use_scenarios else None)
        self.repeat = RepeatIntention(k, c.hidden_units, dropout=c.dropout, l2=c.l2, use_repeat=c.use_repeat,
                                      combination=c.repeat_combination, scorers=c.repeat_scorers,
                                      name="repeat_intention")
        self._tasks.append(BinaryTask(CTR, CLICK, c.w_ctr))

    def _positions(self, names, what) -> Tuple[list, list]:
        """(field positions, dense positions) of transformed input names."""
        names = list(names)
        if not names:
            raise ValueError(f"MUSENET: config.{what} is empty (bind_to_contract fills it from the dataset)")
        missing = [n for n in names if n not in self._fields and n not in self.embedding.dense]
        if missing:
            raise ValueError(f"MUSENET: {what} {missing} are not model inputs; have "
                             f"{self._fields + list(self.embedding.dense)}")
        return ([self._fields.index(n) for n in names if n in self._fields],
                [self.embedding.dense.index(n) for n in names if n in self.embedding.dense])

    @property
    def output_names_(self):
        names = [CTR]
        if self.config.use_scenarios:
            names.append(SCENARIO)
        if self.config.use_repeat:
            names.append(REPEAT_INTENTION)
        return tuple(names)

    def _select(self, fields, dense, positions) -> tf.Tensor:
        """[B, len(fp) * D + len(dp)] from field embeddings [B, F, D] and dense values [B, Nd]."""
        fp, dp = positions
        parts = []
        if fp:
            parts.append(tf.reshape(tf.gather(fields, fp, axis=1), [-1, len(fp) * self.embedding.embedding_dim]))
        if dp:
            parts.append(tf.gather(dense, dp, axis=1))
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def forward(self, features, training=None, update_prototypes: bool = False) -> Dict[str, tf.Tensor]:
        """Every intermediate: ``a``, ``q`` [B, K], ``z`` [B, K], ``p_r`` [B, K] (with the repeat module),
        ``logit`` [B, 1], plus the public outputs. ``update_prototypes``: Step 1 of Eq. 13 (Eq. 14 on this
        batch, Theta fixed) before the assignment is computed with the moved prototypes (Step 2)."""
        c = self.config
        fields = self.embedding.field_embeddings(features)                                 # [B, F, D]
        dense = self.embedding.dense_values(features) if self.embedding.dense else None    # [B, Nd]
        parts = [tf.reshape(fields, [-1, len(self._fields) * self.embedding.embedding_dim])]
        x = tf.concat(parts + ([dense] if dense is not None else []), axis=1)              # [B, N]
        batch = tf.shape(x)[0]
        if self.scenarios is not None:
            xs = x if self._scenario is None else self._select(fields, dense, self._scenario)
            if update_prototypes:
                if not self.scenarios.built:
                    self.scenarios.build(xs.shape)
                projected = tf.stop_gradient(self.scenarios.project(xs))
                with tf.control_dependencies([self.scenarios.seed_prototypes(projected)]):
                    projected = tf.identity(projected)
                a_fixed, _ = self.scenarios.assign(projected, training=True)
                self.scenarios.update_prototypes(projected, a_fixed)                         # Eq. 14
            a, q, _ = self.scenarios(xs, training=training)
        else:
            a = q = tf.ones([batch, 1], tf.float32)
        if c.use_repeat:
            xi = self._select(fields, dense, self._intention)
            in_history = tf.reshape(tf.cast(features[c.in_history], tf.float32), [-1, 1])
        else:
            xi, in_history = x, tf.zeros([batch, 1], tf.float32)
        out = dict(self.repeat(xi, x, in_history, training=training))
        logit = tf.reduce_sum(a * out["z"], axis=1, keepdims=True)                        # §3.2.3
        out.update(a=a, q=q, logit=logit)
        out[CTR] = tf.sigmoid(logit)
        if self.scenarios is not None:
            out[SCENARIO] = q
        if c.use_repeat:
            out[REPEAT_INTENTION] = tf.reduce_sum(a * out["p_r"], axis=1, keepdims=True)
        return out

    def call(self, features, training=None):
        out = self.forward(features, training=training)
        return {name: out[name] for name in self.output_names_}

    def loss_terms(self, features, labels, training: bool = False, update_prototypes: bool = False):
        """(L_T, D_KL, L_A) of Eq. 13; L_T also feeds the task's metrics."""
        out = self.forward(features, training=training, update_prototypes=update_prototypes)
        l_t = self._tasks[0].compute_loss(labels, out)                                       # Eq. 11
        if self.scenarios is None:
            kl = tf.constant(0.0)
        elif self.config.kl_term == "marginal":
            kl = ScenarioLearner.marginal_kl_to_uniform(out["a"])
        else:
            kl = ScenarioLearner.kl_to_uniform(out["a"])                                    # Eq. 12
        if self.config.use_repeat:
            r = tf.reshape(tf.cast(labels[REPEAT_RATIO_LABEL], tf.float32), [-1, 1])
            l_a = tf.reduce_mean(tf.square(r - out[REPEAT_INTENTION]))                      # Eq. 10
        else:
            l_a = tf.constant(0.0)
        return l_t, kl, l_a

    def compute_loss(self, features, labels, training: bool = False, update_prototypes: bool = False) -> tf.Tensor:
        c = self.config
        l_t, kl, l_a = self.loss_terms(features, labels, training, update_prototypes)
        loss = self._tasks[0].weight * l_t + c.w_kl * kl + c.beta * l_a                    # Eq. 13
        if self.losses:
            loss += tf.add_n(self.losses)
        return loss

    def training_loss(self, features, labels) -> tf.Tensor:
        """Alternating optimisation (Eq. 13): Eq. 14 moves the prototypes inside this forward pass, then the
        base ``train_step`` takes the gradient step on Theta with them held fixed."""
        return self.compute_loss(features, labels, training=True, update_prototypes=True)
