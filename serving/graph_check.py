"""Static check that stock TF Serving can run a SavedModel: no Python ops, no non-core ops, no hard placement.

TF Serving runs ``saved_model.pb`` in C++ with only core TensorFlow's kernels linked in. It cannot run

* Python-backed ops (``PyFunc``, ``EagerPyFunc``, ``PyFuncStateless``: ``tf.py_function`` / ``tf.numpy_function``);
* ops that are not registered by core TensorFlow (custom ops from ``tf.load_op_library``, e.g. a text or
  recommenders add-on): they are rejected if this process does not know them at all, and also if they are
  registered here only by a library loaded into this process (they then lack a ``tf.raw_ops`` entry);
* graphs pinned to devices the server may not have.

Placement rule: every node on the serving path (what the signatures and the init op reach, through nodes'
inputs and the functions they call) must have an empty ``device``. Outside it only the checkpoint
save/restore functions remain, which ``tf.saved_model.save`` itself pins to the host CPU: a CPU pin is allowed
there, any other device is not.

The walk covers ``meta_graphs[*].graph_def`` nodes and every function of its library.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Set

PY_FUNC_OPS = frozenset({"PyFunc", "EagerPyFunc", "PyFuncStateless"})


class ServabilityError(ValueError):
    """The SavedModel would not load or run in stock TF Serving; ``problems`` lists why."""

    def __init__(self, saved_model_dir: str, problems: List["Problem"]):
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{saved_model_dir}: not servable by stock TF Serving "
                         f"({len(problems)} problem(s)):\n  {shown}{more}")


@dataclass(frozen=True)
class Problem:
    where: str   # "graph" or the library function's name
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: node {self.node!r} (op {self.op}): {self.reason}"


def _load(saved_model_dir: str):
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(saved_model_dir, "saved_model.pb")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{saved_model_dir}: no saved_model.pb (is this a SavedModel version directory?)")
    sm = saved_model_pb2.SavedModel()
    with open(path, "rb") as fh:
        sm.ParseFromString(fh.read())
    return sm


def _op_problem(op: str, functions: Set[str]) -> str | None:
    """Why ``op`` cannot run in TF Serving, or None."""
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    if op in functions:
        return None  # a call of a function from the library (checked node by node itself)
    if op in PY_FUNC_OPS:
        return "runs Python code, which TF Serving cannot execute (tf.py_function / tf.numpy_function)"
    if op_def_registry.get(op) is None:
        return "op is not registered in core TensorFlow (a custom op library TF Serving does not link)"
    if not hasattr(tf.raw_ops, op):
        return "op is registered only by a library loaded into this process, not by core TensorFlow"
    return None


def _called_functions(node) -> Iterable[str]:
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func.name
        if value.HasField("list"):
            for fn in value.list.func:
                yield fn.name


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _serving_path(meta_graph) -> tuple[Set[str], Set[str]]:
    """(graph node names, function names) reachable from the signatures and the init op."""
    graph = {n.name: n for n in meta_graph.graph_def.node}
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    todo = []
    for sig in meta_graph.signature_def.values():
        for info in list(sig.inputs.values()) + list(sig.outputs.values()):
            if info.name:
                todo.append(_node_name(info.name))
    for key in ("saved_model_main_op", "legacy_init_op", "table_initializer"):
        if key in meta_graph.collection_def:
            todo.extend(_node_name(n) for n in meta_graph.collection_def[key].node_list.value)
    nodes: Set[str] = set()
    fns: Set[str] = set()
    fn_todo: List[str] = []
    while todo:
        name = todo.pop()
        if name in nodes or name not in graph:
            continue
        nodes.add(name)
        node = graph[name]
        todo.extend(_node_name(i) for i in node.input)
        fn_todo.extend(list(_called_functions(node)) + ([node.op] if node.op in library else []))
    while fn_todo:
        name = fn_todo.pop()
        if name in fns or name not in library:
            continue
        fns.add(name)
        for node in library[name].node_def:
            fn_todo.extend(list(_called_functions(node)) + ([node.op] if node.op in library else []))
    return nodes, fns


def _placement_problem(device: str, on_serving_path: bool) -> str | None:
    if not device:
        return None
    if on_serving_path:
        return f"hard device placement {device!r} on the serving path (must be empty: the server places ops)"
    if "CPU" not in device.upper():
        return f"hard device placement {device!r} (only the checkpoint functions' host-CPU pin is allowed)"
    return None


def find_problems(saved_model_dir: str) -> List[Problem]:
    """Every reason stock TF Serving could not run ``saved_model_dir`` (empty list = servable)."""
    sm = _load(saved_model_dir)
    problems: List[Problem] = []
    cache: Dict[str, str | None] = {}
    for meta_graph in sm.meta_graphs:
        functions = {f.signature.name for f in meta_graph.graph_def.library.function}
        serving_nodes, serving_fns = _serving_path(meta_graph)

        def check(where: str, node, on_path: bool) -> None:
            if node.op not in cache:
                cache[node.op] = _op_problem(node.op, functions)
            for reason in (cache[node.op], _placement_problem(node.device, on_path)):
                if reason:
                    problems.append(Problem(where, node.name, node.op, reason))

        for node in meta_graph.graph_def.node:
            check("graph", node, node.name in serving_nodes)
        for fn in meta_graph.graph_def.library.function:
            for node in fn.node_def:
                check(fn.signature.name, node, fn.signature.name in serving_fns)
    return problems


def check_servable(saved_model_dir: str) -> None:
    """Raises ``ServabilityError`` naming every offending node, or returns None."""
    problems = find_problems(saved_model_dir)
    if problems:
        raise ServabilityError(saved_model_dir, problems)
