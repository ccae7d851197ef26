"""The README and docs/ against the code: commands that run as written, flags that exist, every schema key documented.

* Every ``python -m MODULE`` a doc names is a module that exists; every ``--flag`` a documented command line passes
  to it is one its ``--help`` lists (or a Beam pipeline option, which ``pipeline.run`` passes through).
* The fast commands (``FAST``) are run as written, from a scratch copy of the repository's layout.
* Every key and every enumerated value the schema parser accepts appears in ``docs/schema.md``; the complete
  example there parses.
* The README is at most 200 lines, opens with the two commands, and every relative link resolves.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FAST = ("serving.tf_serving_config", "pipeline.infer_schema")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _bash_blocks(text: str):
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def documented_commands():
    """(doc, argv) for every ``python -m`` command line in a bash block (continuations joined, comments dropped)."""
    out = []
    for doc in DOCS:
        for block in _bash_blocks(_read(doc)):
            block = re.sub(r"\\\n\s*", " ", block)
            for line in block.splitlines():
                line = line.split(" #", 1)[0].strip()
                m = re.search(r"(?:\.venv/bin/)?python -m (\S+)(.*)", line)
                if not m or line.startswith("#"):
                    continue
                rest = re.split(r"\s*(?:;|&&|\|\|)\s*", m.group(2))[0]
                argv = shlex.split(rest.replace("$day", "01"))
                if "--" in argv:  # a launcher's own options, then pipeline.run's (python -m pipeline.cluster ... -- ...)
                    cut = argv.index("--")
                    out.append((os.path.relpath(doc, ROOT), "pipeline.run", argv[cut + 1:]))
                    argv = argv[:cut]
                out.append((os.path.relpath(doc, ROOT), m.group(1), argv))
    return out


def named_modules():
    """Every module a doc names as ``python -m MODULE``, in code blocks or inline."""
    names = set()
    for doc in DOCS:
        names.update(re.findall(r"python -m ([A-Za-z_][\w.]*[A-Za-z_\d])", _read(doc)))
    return sorted(n for n in names if n.split(".")[0] in ("pipeline", "serving"))


def test_every_documented_module_exists():
    missing = [m for m in named_modules() if importlib.util.find_spec(m) is None]
    assert not missing, f"docs name modules that do not exist: {missing}"
    assert len(named_modules()) >= 10


def _help(module: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, f"python -m {module} --help failed:\n{r.stderr[-2000:]}"
    return r.stdout


def test_every_documented_flag_is_accepted():
    from apache_beam.options.pipeline_options import PipelineOptions

    beam = set(PipelineOptions([]).get_all_options(retain_unknown_options=False))
    commands = documented_commands()
    modules = sorted({m for _, m, _ in commands})
    assert "pipeline.run" in modules and "pipeline.retrain" in modules
    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(modules, pool.map(_help, modules)))
    bad = []
    for doc, module, argv in commands:
        for arg in argv:
            if not arg.startswith("--"):
                continue
            flag = arg.split("=", 1)[0]
            if flag[2:] in beam and module in ("pipeline.run", "pipeline.benchmark", "pipeline.retrain"):
                continue
            names = {flag, "--no-" + flag[2:], "--[no-]" + flag[2:]}
            if not any(re.search(re.escape(n) + r"\b", helps[module]) for n in names):
                bad.append(f"{doc}: python -m {module} {flag}")
    assert not bad, "documented flags the command does not accept:\n" + "\n".join(bad)


def test_fast_commands_run_as_written(tmp_path):
    """The fast commands, run as written from a scratch directory laid out like the repository (so relative
    paths such as ``../shared`` and ``docker/config`` resolve the same way without touching the checkout)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(SHARED, tmp_path / "shared")
    for name in ("transforms", "artifacts"):
        if os.path.exists(os.path.join(ROOT, name)):
            os.symlink(os.path.join(ROOT, name), repo / name)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    ran = []
    for doc, module, argv in documented_commands():
        if module not in FAST:
            continue
        r = subprocess.run([sys.executable, "-m", module, *argv], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{doc}: python -m {module} {' '.join(argv)}\n{r.stderr[-3000:]}"
        ran.append(module)
    assert set(ran) == set(FAST), f"expected the docs to show each of {FAST}; ran {ran}"
    assert (repo / "docker" / "config" / "models.config").exists()
    drafted = list(repo.glob("*.yaml"))
    assert drafted, "infer_schema wrote no schema"


def _parser_keys():
    """Every key the schema parser accepts (the allowed lists passed to ``unknown_keys``) and every value of its
    enumerations, read from the parser's source, not from a list kept beside it."""
    import transforms.schema as S

    tree = ast.parse(_read(S.__file__))
    keys = {"names"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "unknown_keys" and len(node.args) >= 2:
            keys.update(c.value for c in ast.walk(node.args[1])
                        if isinstance(c, ast.Constant) and isinstance(c.value, str))
    keys.update(S.ValidationSpec.__dataclass_fields__)
    values = set(S.FORMATS) | set(S.COMPRESSIONS) | set(S.TRANSFORMS) | set(S.SPLITS) | set(S.CHECKS) | set(S.TYPES)
    return keys, values


def test_every_schema_key_and_value_is_documented():
    doc = _read(os.path.join(ROOT, "docs", "schema.md"))
    keys, values = _parser_keys()
    assert {"path", "top_k", "history_length", "drift_psi", "prefix"} <= keys  # the extraction itself works
    missing = sorted(k for k in keys | values if f"`{k}`" not in doc and not re.search(rf"\b{re.escape(k)}:", doc))
    assert not missing, f"docs/schema.md does not mention: {missing}"


def test_schema_doc_example_parses():
    import yaml

    from transforms.schema import parse_schema

    doc = _read(os.path.join(ROOT, "docs", "schema.md"))
    example = re.search(r"## A complete example\s+```yaml\n(.*?)```", doc, flags=re.S).group(1)
    schema = parse_schema(yaml.safe_load(example), os.path.join(ROOT, "docs", "example.yaml"))
    assert schema.contract.labels.click == "clk"
    assert len(schema.contract.categorical) >= 27 and schema.split.kind == "time"


def test_readme_is_short_opens_with_the_two_commands_and_links_resolve():
    readme = _read(os.path.join(ROOT, "README.md"))
    assert len(readme.splitlines()) <= 200
    first = _bash_blocks(readme)[0].strip().splitlines()
    assert first == ["bash scripts/setup.sh && .venv/bin/python -m pipeline.run --runner=DirectRunner",
                     "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n 2 --dist loadfile"]
    ci = _read(os.path.join(ROOT, ".ci", "run")).splitlines()
    assert ci[-1] == first[1], "CI must run the README's test command"
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)", _read(doc)):
            if "://" in target:
                continue
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(doc), target))):
                broken.append(f"{os.path.relpath(doc, ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"
