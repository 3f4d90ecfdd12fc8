"""Helpers shared by job entry points: logging set-up, YAML configs with dotted overrides."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "variants=[ciea,marvel]"]`` → nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(model: type[BaseModel], path: str | None, overrides: list[str], base: dict[str, Any]) -> BaseModel:
    """Builds the typed job config from preset defaults ← YAML file ← ``--set`` overrides.

    Exits with every validation error listed (field, value, message) before anything runs.
    """
    data = dict(base)
    if path:
        data = deep_merge(data, yaml.safe_load(Path(path).read_text()) or {})
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']} ({_shown(err)})" for err in e.errors()]
        raise SystemExit("invalid config:\n" + "\n".join(lines)) from None


def _shown(err: Any) -> str:
    # Object-store settings may hold a credential by mistake: never echo them.
    if "storage_options" in map(str, err["loc"]):
        return "value not shown"
    return f"got {err.get('input')!r}"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One ``  key = default`` line (plus its description) per leaf field of a pydantic
    config, nested models flattened to dotted keys: the ``--help`` epilog of a job."""
    lines = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += config_keys(ann, f"{prefix}{name}.")
        else:
            default = f.default if f.default_factory is None else f.default_factory()
            lines.append(f"  {prefix}{name} = {default!r}\n      {f.description or ''}")
    return lines


def init_ray(*, address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None,
             log_to_driver: bool = True, **kwargs: Any) -> bool:
    """Joins or starts Ray unless this process already has it; True if this call did.

    Inside ``ray job submit`` (``RAY_ADDRESS`` is set) or with ``address`` it joins that
    cluster: a local CPU count or temp dir would not match it, and ``ray.init`` would fail
    to find the node. Otherwise it starts a local Ray with its session files in
    ``temp_dir`` (default: a new short ``/tmp/ray-*``; Ray's unix sockets need a short path)
    and token authentication off, so nothing is written to ``~/.ray``.
    """
    import os
    import tempfile

    import ray

    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": log_to_driver, "configure_logging": False}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **common)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if temp_dir:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
    else:
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus, _temp_dir=temp_dir, **common, **kwargs)
    return True


def yaml_str(value: str) -> str:
    """``value`` as a single-quoted YAML scalar, so a flag's text stays a string after
    ``--set`` parsing (a path like ``2024``, a name like ``on``)."""
    return "'" + value.replace("'", "''") + "'"


def flag_overrides(args: Any, flags: dict[str, str], storage_key: str | None = None) -> list[str]:
    """Dotted ``key=value`` overrides for the flags given on the command line.

    ``flags`` maps argparse attributes to config keys; numbers stay numbers, text is quoted
    (:func:`yaml_str`). With ``storage_key`` (e.g. ``input.storage_options``) every
    ``--storage-option KEY=VALUE`` lands under it. Callers append their own extras and the
    user's ``--set`` pairs after these, so ``--set`` wins.
    """
    out: list[str] = []
    for attr, key in flags.items():
        value = getattr(args, attr)
        if value is not None:
            out.append(f"{key}={value}" if isinstance(value, int) else f"{key}={yaml_str(value)}")
    if storage_key:
        for pair in getattr(args, "storage_option", None) or []:
            if "=" not in pair:
                raise SystemExit(f"--storage-option {pair!r}: expected KEY=VALUE, e.g. AWS_REGION=us-east-1")
            key, value = pair.split("=", 1)
            out.append(f"{storage_key}.{key}={yaml_str(value)}")
    return out


def refuse_secrets(prog: str, config_path: str | None, overrides: list[str], storage_key: str) -> None:
    """Rejects credentials in the storage options (``storage_key``, dotted) of the config file
    and overrides *before* the config is parsed, so that no validation error echoes one."""
    from pipelines.store.storage import check_storage_options

    data: Any = (yaml.safe_load(Path(config_path).read_text()) or {}) if config_path else {}
    data = deep_merge(data, parse_overrides(overrides))
    for part in storage_key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    try:
        check_storage_options(data if isinstance(data, dict) else {})
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None
