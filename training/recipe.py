"""Reading training recipes: a YAML file mirrored by a dataclass, plus ``--set FIELD=VALUE`` overrides.

Shared by every ``mixllm train`` role. A dotted override (``model.image.pooled_grid=4``) sets a key
inside a nested section (the model's own config sections are nested, never copied into the recipe).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from mixllm.errors import MixLLMError

CONFIG_DIR = Path(__file__).parent / "configs"


class RecipeError(MixLLMError, ValueError):
    """A recipe field is invalid; the message starts with the field name."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["field=value", ...]`` -> ``{field: yaml value}`` (``lr=1e-4`` is a float, ``x=null`` None)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError("--set", f"expected FIELD=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
            if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
                try:
                    value = float(value) if any(c in value for c in ".eE") else value
                except ValueError:
                    pass
            out[key] = value
        except yaml.YAMLError:
            raise RecipeError(key, f"cannot read {raw!r} as a value") from None
    return out


def _apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    head, dot, rest = key.partition(".")
    if not dot:
        raw[key] = value
        return
    section = raw.get(head)
    if section is None:
        section = raw[head] = {}
    if not isinstance(section, dict):
        raise RecipeError(key, f"{head} is not a section (it is {section!r})")
    _apply_override(section, rest, value)


def _resolve(path: str | Path, relative_to: Path | None = None) -> Path:
    path = Path(path)
    for candidate in (path, (relative_to or CONFIG_DIR) / path, CONFIG_DIR / path):
        if candidate.is_file():
            return candidate
    raise RecipeError("config", f"{path} not found (recipes: {', '.join(p.name for p in sorted(CONFIG_DIR.glob('*.yaml')))})")


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` over ``base``; nested sections merge key by key (``None`` replaces a section)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_raw_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's mapping with its ``extends:`` chain resolved: ``extends: student.yaml`` starts
    from that recipe (looked up next to this file, then in ``training/configs``) and this file's keys
    win, section by section. A variant names only what it changes."""
    path = _resolve(path, _seen[-1].parent if _seen else None)
    if path.resolve() in _seen:
        raise RecipeError("extends", f"{path} extends itself (chain: {' -> '.join(p.name for p in _seen)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError("config", f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError("config", f"{path} must hold a mapping of fields, got {type(raw).__name__}")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError("extends", f"{path}: must be a recipe file name, got {base!r}")
    return _merge(read_raw_recipe(base, (*_seen, path.resolve())), raw)


def read_recipe(cls, path: str | Path, overrides: dict[str, Any] | None = None):
    """An instance of the dataclass ``cls`` from a YAML recipe (a bare file name is looked up in
    ``training/configs``; ``extends:`` chains are resolved); ``overrides`` win, dotted keys reach into
    nested sections."""
    raw = read_raw_recipe(path)
    for key, value in (overrides or {}).items():
        _apply_override(raw, key, value)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(unknown[0], f"unknown key in {path} or the overrides (known: {', '.join(sorted(known))})")
    try:
        return cls(**raw)
    except TypeError as error:  # a value of the wrong type, e.g. a string where a number belongs
        raise RecipeError("config", f"{path}: {error}") from None


def start_run(num_threads: int | None, seed: int, resume: str | Path | None) -> None:
    """What every training run does first: torch's CPU threads, a ``--resume`` file that exists, the seeds."""
    import lightning as L
    import torch

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if resume is not None and not Path(resume).is_file():
        raise RecipeError("resume", f"{resume} is not a Lightning checkpoint file")
    L.seed_everything(seed, verbose=False)


def keep_trainable_only(module, checkpoint: dict) -> None:
    """A LightningModule's ``on_save_checkpoint``: keep the parameters that train; the frozen base LLM and
    vision tower are referenced by the model's config, not copied into every ``.ckpt``."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
