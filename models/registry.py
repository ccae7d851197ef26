"""Model names selectable with ``--model`` and their config presets."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

from models import autoint, esm2, esmm, gprec, mmoe, musenet, ple, stan, ussr

MODELS = {
    "esm2": (esm2.ESM2, esm2.PRESETS),
    # ESM²'s presets: its paper's Table 2 is also the setting of its ESMM and DNN baselines (esmm:paper, dnn:paper).
    "esmm": (esmm.ESMM, esm2.PRESETS),
    "dnn": (esmm.CTRDNN, esm2.PRESETS),
    "mmoe": (mmoe.MMoE, mmoe.PRESETS),
    "ple": (ple.PLE, ple.PRESETS),
    "stan": (stan.STAN, stan.PRESETS),
    "stan_nobeta": (stan.STAN, stan.PRESETS_NO_BETA),
    "gprec": (gprec.GPRec, gprec.PRESETS),
    "gprec_dcn": (gprec.GPRec, gprec.PRESETS_DCN),
    "musenet": (musenet.MUSENET, musenet.PRESETS),
    "musenet_base": (musenet.MUSENET, musenet.PRESETS_BASE),
    "musenet_no_scenarios": (musenet.MUSENET, musenet.PRESETS_NO_SCENARIOS),
    "musenet_no_repeat": (musenet.MUSENET, musenet.PRESETS_NO_REPEAT),
    "ussr": (ussr.USSR, ussr.PRESETS),
    "autoint": (autoint.AutoInt, autoint.PRESETS),
}


def model_class(model: str):
    return _lookup(model)[0]


def required_labels(model: str) -> Sequence[str]:
    return _lookup(model)[0].REQUIRED_LABELS


def auto_model(labels: Sequence[str]) -> str:
    """The richest model the dataset's labels support: esm2 > esmm > dnn."""
    for name in ("esm2", "esmm", "dnn"):
        if set(required_labels(name)) <= set(labels):
            return name
    raise ValueError(f"no model fits labels {list(labels)} (a click label is required)")


def available() -> Sequence[str]:
    return sorted(MODELS)


def presets(model: str) -> Sequence[str]:
    return sorted(_lookup(model)[1])


def _lookup(model: str):
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(available())}")
    return MODELS[model]


def resolve_config(model: str, preset: str = "default", overrides: Dict | None = None):
    cls, table = _lookup(model)
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r} for model {model!r}; available: {', '.join(sorted(table))}")
    base = table[preset].to_dict()
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in base:
            raise ValueError(f"model {model!r} has no config field {key!r}")
        base[key] = value
    return type(table[preset])(**base)


def build(model: str, categorical: Mapping[str, int], dense: Sequence[str], config,
          sequences: Mapping[str, int] | None = None):
    cls, _ = _lookup(model)
    return cls(categorical=categorical, dense=dense, config=config, sequences=sequences or {}, name=model)
