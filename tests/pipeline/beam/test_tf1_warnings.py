"""The TF1-mode warnings tensorflow-transform logs on every preprocessing run are dropped; other warnings of the
same loggers still reach the user."""
import logging

from pipeline.beam.preprocess import quiet_expected_tf1_warnings


def test_only_the_expected_tf1_warnings_are_dropped(caplog):
    quiet_expected_tf1_warnings()
    quiet_expected_tf1_warnings()  # idempotent: one filter per logger
    assert sum(type(f).__name__ == "_ExpectedTF1Warnings" for f in logging.getLogger("tensorflow").filters) == 1
    with caplog.at_level(logging.WARNING):
        tf_log, absl_log = logging.getLogger("tensorflow"), logging.getLogger("absl")
        absl_log.warning("Tensorflow Transform is running in tf.compat.v1 mode. This could be either because ...")
        tf_log.warning("Issue encountered when serializing tft_mapper_use.\nType is unsupported, ...")
        tf_log.warning('Expected binary or unicode string, got type_url: "type.googleapis.com/tensorflow.'
                       'AssetFileDef"\nvalue: "\\n\\013\\n\\tConst_2:0\\022\\010vocab_C1"')
        tf_log.warning("From /x/signature_def_utils_impl.py:225: build_tensor_info (from tensorflow.python.saved_model."
                       "utils_impl) is deprecated and will be removed in a future version.")
        tf_log.warning("a vocabulary file is empty: %s", "vocab_C1")
        absl_log.warning("something else in %s mode", "tf.compat.v1")
    assert [r.getMessage() for r in caplog.records] == ["a vocabulary file is empty: vocab_C1",
                                                       "something else in tf.compat.v1 mode"]
