"""Inputs at the built-in data's widths, for tests of a model's parameter count outside the embeddings."""
import tensorflow as tf

# The built-in data's model inputs: 20 embedded fields (x 16) and 40 dense values, 360 in all.
CATEGORICAL = {f"f{i}": 10 for i in range(20)}
DENSE = tuple(f"d{i}" for i in range(40))


def features(*flags: str):
    """A batch of two all-zero rows of CATEGORICAL, DENSE and the float ``flags``."""
    feats = {k: tf.zeros([2, 1], tf.int64) for k in CATEGORICAL}
    feats.update({k: tf.zeros([2, 1]) for k in DENSE + flags})
    return feats


def tower_params(model, feats) -> int:
    """Trainable parameters of ``model`` outside its embedding tables, after one call on ``feats``."""
    model(feats)
    return sum(int(v.shape.num_elements()) for v in model.trainable_variables if "embedding" not in v.name)
