"""Presets that claim a paper's setting, read against the numbers quoted from that paper (or the authors' code).

Every expected value below is a literal with the sentence it comes from next to it; the ESM² sentences are also
looked up in ../shared/papers/ (skipped where the papers are absent), so a misquote fails too. MMoE and PLE
have no preset named ``paper``: their papers are not in ../shared/papers, and what they have instead
(``esm2_paper``) is ESM²'s setting, checked here against ESM²'s sentences.
"""
import os
import re

import numpy as np
import pytest

from models import registry
from models.keras import keras
from transforms.schema import default_shared_dir

ESM2_PAPER = "esm2-entire-space-post-click-decomposition.txt"

# ESM² (Wen et al., SIGIR 2020), verbatim from ../shared/papers/esm2-entire-space-post-click-decomposition.txt.
ADAM = ("For the deep neural network-based models, they are implemented in TensorFlow using the Adam "
        "optimizer.")                                                                          # §4.1.4
LR_BATCH = "The learning rate is set to 0.0005 and the mini-batch size is set to 1000."       # §4.1.4
MLP = ("There are 5 layers in the *MLP*, where the dimension of each layer is set to 512, 256, 128, 32, and 2, "
       "respectively, as summarized in Table 2.")                                              # §4.1.4
TABLE2 = "Table 2: Hyper-parameters of deep neural network-based models including DNN, DNN-OS, ESMM, and ESM^2 ."
ESMM_BACKBONE = "For a fair comparison, we use the same backbone structure as the above deep models for ESMM."
DROPOUT = "Therefore, we set it to 0.5 in all the experiments if not specified."               # §4.3.1
EMBEDDING = ("Therefore, to make a trade-off between model capacity and complexity, we set the dimension of item "
             "feature embeddings to 128 in all the experiments if not specified.")             # §4.3.1
WEIGHTS = ("w_{ctr} , w_{ctavr} , w_{ctcvt} are loss weights of L_{ctr} , L_{ctavr} , L_{ctcvt} , which are set "
           "to 1 in this paper, respectively.")                                                # §3.4, Eq. 11
DENSE = ("Therefore, we use the normalization-based embedding method for dense numerical features in all the "
         "experiments if not specified.")                                 # §4.3.2: g = tanh((f - mu) / sigma)


def _esm2_paper_values(cfg):
    # LR_BATCH: "The learning rate is set to 0.0005 ..."
    assert cfg.learning_rate == 0.0005
    # LR_BATCH: "... and the mini-batch size is set to 1000."
    assert cfg.batch_size == 1000
    # DROPOUT: "Therefore, we set it to 0.5 in all the experiments if not specified."
    assert cfg.dropout == 0.5
    # EMBEDDING: "... we set the dimension of item feature embeddings to 128 in all the experiments ..."
    assert cfg.embedding_dim == 128


@pytest.mark.parametrize("sentence", [ADAM, LR_BATCH, MLP, TABLE2, ESMM_BACKBONE, DROPOUT, EMBEDDING, WEIGHTS,
                                      DENSE])
def test_the_quoted_esm2_sentences_are_in_the_paper(sentence):
    path = os.path.join(default_shared_dir(), "papers", ESM2_PAPER)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"\s+", " ", f.read())
    assert sentence in text


@pytest.mark.parametrize("model", ["esm2", "esmm", "dnn"])
def test_esm2_paper_preset_is_the_papers_setting(model):
    # esmm and dnn: TABLE2 ("... including DNN, DNN-OS, ESMM, and ESM^2") and ESMM_BACKBONE make the same
    # table the ESM² paper's setting of its DNN and ESMM baselines.
    for preset in ("paper", "esm2_paper"):
        cfg = registry.resolve_config(model, preset)
        _esm2_paper_values(cfg)
        # MLP: "... the dimension of each layer is set to 512, 256, 128, 32, and 2": four hidden layers and the
        # output (the paper's 2-way softmax is our single sigmoid logit, added by the tower itself).
        assert cfg.hidden_units == (512, 256, 128, 32)
        # WEIGHTS: "w_{ctr} , w_{ctavr} , w_{ctcvt} ... which are set to 1 in this paper"
        assert (cfg.w_ctr, cfg.w_ctavr, cfg.w_ctcvr) == (1.0, 1.0, 1.0)
        # DENSE (Eq. 17): dense numerical features enter as tanh of their z-score.
        assert cfg.dense_activation == "tanh"
        # No L2 is mentioned anywhere in the paper.
        assert cfg.l2 == 0.0


@pytest.mark.parametrize("model", ["mmoe", "ple"])
def test_mmoe_and_ple_borrow_esm2s_setting_under_its_name_and_claim_no_paper_of_their_own(model):
    # Their papers are not in ../shared/papers: no preset may be called "paper".
    assert "paper" not in registry.presets(model)
    cfg = registry.resolve_config(model, "esm2_paper")
    _esm2_paper_values(cfg)
    assert (cfg.w_ctr, cfg.w_ctavr, cfg.w_ctcvr) == (1.0, 1.0, 1.0)       # WEIGHTS
    if model == "mmoe":
        # ESM²'s MLP (MLP: "512, 256, 128, 32, and 2") split into experts 512-256 and towers 128-32.
        assert cfg.expert_units + cfg.hidden_units == (512, 256, 128, 32)


def test_autoint_paper_preset_is_the_authors_autoint_plus_run():
    # The AutoInt paper is not in ../shared/papers. The values are those of the authors' released code,
    # github.com/DeepGraphLearning/RecommenderSystems, featureRec/run_joint_criteo.sh (AutoInt+ on Criteo):
    #   --blocks 3 --heads 2  --block_shape "[64, 64, 64]"
    #   --deep_layers "[400, 400]" --dropout_keep_prob "[1, 1, 1]"
    #   --epoch 3 --batch_size 1024
    # featureRec/autoint/train.py: parser.add_argument('--embedding_size', type=int, default=16)
    #                              parser.add_argument('--learning_rate', type=float, default=0.001)
    # featureRec/autoint/model.py: tf.train.AdamOptimizer(learning_rate=self.learning_rate,
    #                                  beta1=0.9, beta2=0.999, epsilon=1e-8)
    #   and multihead_attention splits num_units (= block_shape[i]) over num_heads: Q_ = tf.split(Q, num_heads, 2).
    cfg = registry.resolve_config("autoint", "paper")
    assert cfg.attention_layers == 3                     # --blocks 3
    assert cfg.attention_heads == 2                      # --heads 2
    assert cfg.attention_heads * cfg.attention_units == 64   # --block_shape "[64, 64, 64]", split over the heads
    assert cfg.hidden_units == (400, 400)                # --deep_layers "[400, 400]"
    assert cfg.dropout == 0.0                            # --dropout_keep_prob "[1, 1, 1]"
    assert cfg.batch_size == 1024                        # --batch_size 1024
    assert cfg.embedding_dim == 16                       # --embedding_size default=16
    assert cfg.learning_rate == 0.001                    # --learning_rate default=0.001
    assert cfg.adam_epsilon == 1e-8                      # AdamOptimizer(..., epsilon=1e-8)


CATEGORICAL = {"a_id": 5, "b_id": 3}
DENSE_INPUTS = ("x_z",)


def test_esm2_paper_preset_reaches_the_layers():
    """The preset's numbers are the built model's shapes: 2 fields x 128 + 1 dense = 257 inputs per tower,
    towers 257 -> 512 -> 256 -> 128 -> 32 -> 1 (a field the model ignored would leave the default 16 here)."""
    import tensorflow as tf

    model = registry.build("esm2", CATEGORICAL, DENSE_INPUTS, registry.resolve_config("esm2", "paper"))
    feats = {"a_id": tf.zeros([2, 1], tf.int64), "b_id": tf.zeros([2, 1], tf.int64), "x_z": tf.zeros([2, 1])}
    model(feats)
    assert model.embedding(feats).shape == (2, 2 * 128 + 1)
    for tower in model.towers:
        kernels = [w.shape.as_list() for w in tower.weights if len(w.shape) == 2]
        assert kernels == [[257, 512], [512, 256], [256, 128], [128, 32], [32, 1]]
        drops = [layer.rate for layer in tower.submodules if isinstance(layer, keras.layers.Dropout)]
        assert drops and np.allclose(drops, 0.5)
