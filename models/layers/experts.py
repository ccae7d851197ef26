"""Gated mixtures of expert MLPs: MMoE (Ma et al., KDD 2018) and PLE's CGC (Tang et al., RecSys 2020).

Shapes: B batch, N input width, H = ``expert_units[-1]`` (expert output width), E experts, T tasks.
An expert is a ReLU ``MLP`` (no logit unit); a gate is a bias-free linear map followed by a softmax, as in
both papers' equations. The layers return one mixed representation per task; task towers go on top.
"""
from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from models.keras import keras
from models.layers.mlp import MLP


def _mix(gate: tf.Tensor, experts: Sequence[tf.Tensor]) -> tf.Tensor:
    """sum_e gate[:, e] * experts[e]: gate [B, E], experts E x [B, H] -> [B, H]."""
    stacked = tf.stack(list(experts), axis=1)  # [B, E, H]
    return tf.reduce_sum(gate[:, :, None] * stacked, axis=1)


def _check_units(owner: str, expert_units: Sequence[int]) -> List[int]:
    units = [int(u) for u in expert_units]
    if not units or any(u < 1 for u in units):
        raise ValueError(f"{owner}: expert_units must be positive integers, got {list(expert_units)}")
    return units


@keras.utils.register_keras_serializable(package="rankline")
class ExpertGate(keras.layers.Layer):
    """Multi-gate Mixture-of-Experts (MMoE), Ma et al. KDD 2018, Eqs. 7-8.

        f^k(x) = sum_{i=1..E} g^k(x)_i f_i(x)        (Eq. 7)
        g^k(x) = softmax(W_gk x),  W_gk in R^{E x N} (Eq. 8)

    for tasks k = 1..T, with E expert MLPs f_i shared by all tasks and one gate per task whose input is the
    same shared representation x. Input x [B, N]; output: a list of T tensors f^k(x), each [B, H].
    """

    def __init__(self, num_experts: int, expert_units: Sequence[int], num_tasks: int, dropout: float = 0.0,
                 l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if int(num_experts) < 1:
            raise ValueError(f"ExpertGate: num_experts must be >= 1, got {num_experts}")
        if int(num_tasks) < 1:
            raise ValueError(f"ExpertGate: num_tasks must be >= 1, got {num_tasks}")
        self.num_experts = int(num_experts)
        self.expert_units = _check_units("ExpertGate", expert_units)
        self.num_tasks = int(num_tasks)
        self.dropout = float(dropout)
        self.l2 = float(l2)
        reg = keras.regularizers.l2(self.l2) if self.l2 else None
        self.experts = [MLP(self.expert_units, dropout=self.dropout, l2=self.l2, name=f"expert_{i}")
                        for i in range(self.num_experts)]
        self.gates = [keras.layers.Dense(self.num_experts, use_bias=False, kernel_regularizer=reg,
                                         name=f"gate_{k}") for k in range(self.num_tasks)]

    def gate_weights(self, x: tf.Tensor) -> List[tf.Tensor]:
        """g^k(x) for every task: T tensors [B, E], rows summing to 1 (Eq. 8)."""
        return [tf.nn.softmax(gate(x), axis=-1) for gate in self.gates]

    def call(self, x: tf.Tensor, training=None) -> List[tf.Tensor]:
        experts = [expert(x, training=training) for expert in self.experts]
        return [_mix(g, experts) for g in self.gate_weights(x)]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_experts=self.num_experts, expert_units=self.expert_units, num_tasks=self.num_tasks,
                   dropout=self.dropout, l2=self.l2)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class CGC(keras.layers.Layer):
    """Customized Gate Control, one extraction level of PLE (Tang et al., RecSys 2020, §4.2-4.3).

    Each task k owns m_t experts E_k,1..m_t; m_s shared experts E_s,1..m_s serve all tasks. Task k mixes
    only its own and the shared experts:

        g^k(x) = w^k(x) S^k(x)
        w^k(x) = softmax(W_g^k x),  W_g^k in R^{(m_t + m_s) x N}
        S^k(x) = [E_k,1 .. E_k,m_t, E_s,1 .. E_s,m_s]^T    (each expert output [B, H])

    Multi-level PLE (§4.3: g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)): level j gets T + 1 inputs, the
    previous level's task outputs x_1..x_T and its shared output x_s. Task k's experts and gate read x_k;
    the shared experts read x_s. With ``shared_output=True`` (every level but the last) a shared gate reads
    x_s and mixes ALL T * m_t + m_s experts of the level into the next level's shared input:

        g^{s,j}(x) = softmax(W_g^{s,j} x_s) [E_1,1 .. E_T,m_t, E_s,1 .. E_s,m_s]^T

    Input: one tensor x [B, N] (the first level: every task and the shared part read x) or a list of T + 1
    tensors [x_1, .., x_T, x_s], each [B, N]. Output: a list of T tensors [B, H] (task outputs), plus the
    shared output [B, H] at the end when ``shared_output``.
    """

    def __init__(self, num_tasks: int, experts_per_task: int, num_shared_experts: int,
                 expert_units: Sequence[int], shared_output: bool = False, dropout: float = 0.0, l2: float = 0.0,
                 **kwargs):
        super().__init__(**kwargs)
        for field_name, value in (("num_tasks", num_tasks), ("experts_per_task", experts_per_task),
                                  ("num_shared_experts", num_shared_experts)):
            if int(value) < 1:
                raise ValueError(f"CGC: {field_name} must be >= 1, got {value}")
        self.num_tasks = int(num_tasks)
        self.experts_per_task = int(experts_per_task)
        self.num_shared_experts = int(num_shared_experts)
        self.expert_units = _check_units("CGC", expert_units)
        self.shared_output = bool(shared_output)
        self.dropout = float(dropout)
        self.l2 = float(l2)
        reg = keras.regularizers.l2(self.l2) if self.l2 else None

        def expert(name):
            return MLP(self.expert_units, dropout=self.dropout, l2=self.l2, name=name)

        # task_experts[k][i] = E_k,i; shared_experts[i] = E_s,i.
        self.task_experts = [[expert(f"expert_t{k}_{i}") for i in range(self.experts_per_task)]
                             for k in range(self.num_tasks)]
        self.shared_experts = [expert(f"expert_s_{i}") for i in range(self.num_shared_experts)]
        self.task_gates = [keras.layers.Dense(self.experts_per_task + self.num_shared_experts, use_bias=False,
                                              kernel_regularizer=reg, name=f"gate_t{k}")
                           for k in range(self.num_tasks)]
        self.shared_gate = (keras.layers.Dense(self.num_tasks * self.experts_per_task + self.num_shared_experts,
                                               use_bias=False, kernel_regularizer=reg, name="gate_s")
                            if self.shared_output else None)

    def _split_inputs(self, inputs) -> List[tf.Tensor]:
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != self.num_tasks + 1:
                raise ValueError(f"CGC {self.name}: expected one input or {self.num_tasks + 1} "
                                 f"([x_1..x_T, x_s]), got {len(inputs)}")
            return list(inputs)
        return [inputs] * (self.num_tasks + 1)

    def gate_weights(self, inputs) -> List[tf.Tensor]:
        """w^k for every task ([B, m_t + m_s] each), then the shared gate [B, T*m_t + m_s] if any."""
        xs = self._split_inputs(inputs)
        out = [tf.nn.softmax(gate(x), axis=-1) for gate, x in zip(self.task_gates, xs[:-1])]
        if self.shared_gate is not None:
            out.append(tf.nn.softmax(self.shared_gate(xs[-1]), axis=-1))
        return out

    def call(self, inputs, training=None) -> List[tf.Tensor]:
        xs = self._split_inputs(inputs)
        shared = [e(xs[-1], training=training) for e in self.shared_experts]
        own = [[e(x, training=training) for e in experts] for experts, x in zip(self.task_experts, xs[:-1])]
        gates = self.gate_weights(xs)
        outputs = [_mix(g, own_k + shared) for g, own_k in zip(gates, own)]
        if self.shared_gate is not None:
            outputs.append(_mix(gates[-1], [e for own_k in own for e in own_k] + shared))
        return outputs

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_tasks=self.num_tasks, experts_per_task=self.experts_per_task,
                   num_shared_experts=self.num_shared_experts, expert_units=self.expert_units,
                   shared_output=self.shared_output, dropout=self.dropout, l2=self.l2)
        return cfg
