"""The one Keras of the project: tf_keras (Keras 2), never Keras 3.

tensorflow-transform and tensorflow-recommenders both build on tf_keras; mixing Keras 3 objects in breaks
saving and the transform layer. Import ``keras`` from here everywhere.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tf_keras as keras  # noqa: E402

__all__ = ["keras"]
