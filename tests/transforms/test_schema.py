import glob
import os

import pytest
import yaml

from transforms.features import BUILTIN
from transforms.schema import SCHEMA_DIR, SchemaError, builtin_schema_path, expand_names, load_schema, parse_schema

SHARED_SCHEMAS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(SCHEMA_DIR, "*.yaml"))
                        if not p.endswith("builtin.yaml"))


def test_every_shared_dataset_has_a_schema():
    from transforms.schema import default_shared_dir

    datasets = sorted(d for d in os.listdir(os.path.join(default_shared_dir(), "data"))
                      if os.path.isdir(os.path.join(default_shared_dir(), "data", d)))
    assert datasets == SHARED_SCHEMAS


@pytest.mark.parametrize("name", SHARED_SCHEMAS)
def test_shared_schemas_load_and_find_their_files(name):
    schema = load_schema(os.path.join(SCHEMA_DIR, f"{name}.yaml"))
    assert schema.name == name
    assert schema.input.files(), schema.input.path


def test_builtin_schema_equals_the_builtin_contract():
    assert load_schema(builtin_schema_path("builtin")).contract == BUILTIN


def test_expand_names():
    assert expand_names("I{1..3}") == ["I1", "I2", "I3"]
    assert expand_names("f{0..1}_{1..2}") == ["f0_1", "f0_2", "f1_1", "f1_2"]
    assert expand_names("plain") == ["plain"]


BASE = {
    "name": "t",
    "input": {"path": "/tmp/x.csv", "format": "csv"},
    "labels": {"click": "clk"},
    "features": [{"name": "a", "transform": "vocabulary"}],
}


def _with(path, value):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize("path,value,expected", [
    (("features", 0, "transform"), "log2", "features[0] (a).transform: unknown transform 'log2'"),
    (("labels", "click"), _DELETE, "labels.click: expected a non-empty string"),
    (("input", "format"), "xlsx", "input.format: unknown format 'xlsx'"),
    (("input", "csv"), {"header": False}, "input.csv.columns: required when input.csv.header is false"),
    (("features", 0), {"name": "a", "type": "string", "transform": "numeric"}, "features[0] (a).type: a numeric transform needs type int or float"),
    (("split",), {"kind": "time"}, "split.kind: a time split needs roles.timestamp"),
    (("features", 0), {"name": "a", "transform": "vocabulary", "top_k": 0}, "features[0] (a).top_k: expected an integer >= 1"),
    (("features", 0), {"name": "a", "transform": "vocabulary", "bukets": 3}, "unknown key(s) ['bukets']"),
    (("roles",), {"segment": "nope"}, "roles.segment: column 'nope' must also be declared under features"),
    (("split",), {"kind": "hash", "eval_fraction": 1.5}, "split.eval_fraction: expected a number in [0, 1)"),
    (("features",), [], "features: expected a non-empty list"),
    (("labels",), {"click": "clk", "purchase": "a"}, "label/oracle column(s) declared as features: ['a']"),
    (("validation",), {"drift_psi": -1}, "validation.drift_psi: expected a number >= 0, got -1"),
    (("validation",), {"blocking": ["drift", "typo"]}, "validation.blocking: expected a list of checks from"),
    (("validation",), {"drift_l1": 0.2}, "validation: unknown key(s) ['drift_l1']"),
    (("validation",), {"label_rate_change": 1.5}, "validation.label_rate_change: expected a number in [0, 1)"),
    (("features", 0), {"name": "a", "type": "float", "transform": "numeric", "on_invalid": "drop"},
     "features[0] (a).on_invalid: expected one of: reject, missing, got 'drop'"),
    (("features", 0), {"name": "a", "transform": "vocabulary", "on_invalid": "missing"},
     "features[0] (a).on_invalid: only int and float features have invalid values (type is string)"),
    (("labels", "click"), "CHOOSE_ONE_OF [clk, buy]",
     "labels.click: still a draft choice (CHOOSE_ONE_OF [clk, buy]): replace it with one of these column names"),
    (("roles",), {"user_id": "CHOOSE_ONE_OF [a]"}, "roles.user_id: still a draft choice (CHOOSE_ONE_OF [a])"),
])
def test_validation_errors_name_the_file_key_and_problem(path, value, expected):
    with pytest.raises(SchemaError) as info:
        parse_schema(_with(path, value), "/some/dir/my_schema.yaml")
    message = str(info.value)
    assert message.startswith("my_schema.yaml: "), message
    assert expected in message, message


def test_missing_schema_file_and_bad_yaml(tmp_path):
    with pytest.raises(SchemaError, match="schema file not found"):
        load_schema(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SchemaError, match="bad.yaml: not valid YAML"):
        load_schema(str(bad))


def test_validation_section_defaults_and_overrides():
    default = parse_schema(_with(("name",), "t"), "s.yaml").validation
    assert (default.drift_linf, default.drift_psi, default.label_rate_change, default.label_rate_z) == (
        0.1, 0.25, 0.8, 4.0)
    assert default.blocking == ("missing_column", "missing_rate", "reject_rate", "label_rate")
    custom = parse_schema(_with(("validation",), {"drift_linf": 0.3, "blocking": ["drift"]}), "s.yaml").validation
    assert (custom.drift_linf, custom.drift_psi, custom.blocking) == (0.3, 0.25, ("drift",))


def test_on_invalid_defaults_to_reject_and_is_kept_per_feature():
    doc = _with(("features",), [
        {"names": ["x", "y"], "type": "float", "transform": "numeric", "on_invalid": "missing"},
        {"name": "n", "type": "int", "transform": "hash", "hash_buckets": 8, "on_invalid": "missing"},
        {"name": "k", "type": "int", "transform": "vocabulary", "on_invalid": "reject"},
        {"name": "a", "transform": "vocabulary"}])
    assert parse_schema(doc, "s.yaml").on_invalid == {"x": "missing", "y": "missing", "n": "missing"}
    assert parse_schema(_with(("name",), "t"), "s.yaml").on_invalid == {}
