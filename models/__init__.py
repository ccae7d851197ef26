"""Multi-task ranking models (tf_keras, Keras 2). Layers compute, tasks own losses, models wire them."""
