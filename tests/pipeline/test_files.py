"""pipeline.files.write_json_atomically: the file holds the whole new value; no temporary is left behind."""
import json
import os

from pipeline.files import write_json_atomically


def test_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "state.json")
    write_json_atomically(path, {"a": [1, 2, 3], "b": "x" * 1000}, indent=2)
    write_json_atomically(path, {"a": 1})  # shorter than before: nothing of the old content may remain
    with open(path) as fh:
        assert json.load(fh) == {"a": 1}
    assert os.listdir(tmp_path) == ["state.json"]
