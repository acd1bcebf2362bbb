"""Files shipped with the package: the embedded tiny model, its tokenizer and task.

    default_asset()              -> the model folder (config.json, model.safetensors, job.json, ...)
    default_asset("train.jsonl") -> a file in it
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "tiny"


def default_asset(name: str = "") -> Path:
    return Path(str(resources.files(__name__).joinpath(DEFAULT_MODEL, name)))
