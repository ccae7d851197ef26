"""Small file helpers shared by the pipeline's stages (any ``tf.io.gfile`` filesystem: local, GCS, HDFS)."""
from __future__ import annotations

import json
from typing import Any


def write_json_atomically(path: str, obj: Any, indent: int | None = None, default=None) -> None:
    """Writes ``obj`` as JSON to ``path.tmp`` and renames it over ``path``, so a reader sees the old file or
    the whole new one, never a partial write (a job killed mid-write leaves at most the ``.tmp``). ``default``:
    as ``json.dumps``'s (e.g. ``str`` for values JSON has no type for)."""
    import tensorflow as tf

    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=indent, default=default))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path: str) -> Any:
    """The JSON value in ``path``, or None when there is no such file."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as fh:
        return json.loads(fh.read())
