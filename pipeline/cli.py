"""``rankline COMMAND [ARGS]``: one console script for the entry points; each command runs the ``python -m``
module of the same job with ARGS unchanged (those commands stay the documented ones).

    rankline run ...            = python -m pipeline.run ...
    rankline retrain ...        = python -m pipeline.retrain ...
    rankline score ...          = python -m serving.score ...
    rankline benchmark ...      = python -m pipeline.benchmark ...
    rankline infer-schema ...   = python -m pipeline.infer_schema ...
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "run": ("pipeline.run", "the whole job: data -> preprocessing -> training -> evaluation -> export"),
    "retrain": ("pipeline.retrain", "train on a new partition from the last run's state, gate, publish"),
    "score": ("serving.score", "score raw impressions with a SavedModel or a TF Serving endpoint"),
    "benchmark": ("pipeline.benchmark", "models x seeds on one dataset, with a report"),
    "infer-schema": ("pipeline.infer_schema", "draft a dataset schema from a sample of the data"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(["usage: rankline COMMAND [ARGS]   (rankline COMMAND --help for a command's options)", "",
                      "commands:"] + [f"  {name:<{width}}  {help_} (python -m {module})"
                                      for name, (module, help_) in COMMANDS.items()])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rankline: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    if name != "infer-schema":  # it loads TensorFlow only to read TFRecords, quietly by itself
        from serving.tf_quiet import quiet_tensorflow

        quiet_tensorflow(rest)  # before the module's imports load TensorFlow
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
