"""The job shell every ``jobs/<name>.py`` shares: logging set-up, the parser of the shared
flags, YAML configs with dotted overrides, and Ray (:class:`RaySettings`, one spelling)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.store.secrets import MASK, looks_secret, redact, redact_text, write_json  # noqa: F401  (write_json: the jobs' writer)
from pipelines.store.storage import STORAGE_KEY as STORAGE  # noqa: F401  (every job's --storage-option key)
from pipelines.store.storage import move_legacy_keys  # noqa: F401  (the jobs' own moved keys, e.g. num_cpus)

#: Loggers whose INFO lines are ours and reach the terminal; everything else (Ray, Ray
#: Data, Lance, transformers) shows only warnings there, and the rest goes to the run log.
OWN_LOGGERS = ("jobs", "pipelines", "ciea_model", "bench", "__main__")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RayDataNoise(logging.Filter):
    """Drops Ray Data's notice that its progress bars are off: our jobs turn them off to
    draw their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


class _RedactingFormatter(logging.Formatter):
    """Every log line with the credentials inside its URLs masked
    (:func:`pipelines.store.secrets.redact_text`): a URI a user gave with ``user:password@``
    or a presigned one reaches neither the terminal nor the run log as it was."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class _RunLogHandler(logging.FileHandler):
    """The run log. Ray Data re-configures its logger (closing the handlers it finds) and a
    session folder can be deleted while this process lives on (a second run in the same
    process, a test's temporary Ray): a line that cannot be written is dropped, never raised
    into the caller (``FileHandler`` re-opens a closed file outside its own error handling)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:
            pass


class _TerminalFilter(logging.Filter):
    """Our INFO lines, everyone's warnings: what a person at the terminal needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name.split(".", 1)[0] in OWN_LOGGERS


def setup_logging(verbose: bool = False) -> None:
    """The terminal shows our progress and summaries; Ray's and the libraries' own INFO
    lines go only to the run log (:func:`log_to_file`). ``-v`` shows everything."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_ciea_terminal", False):
            root.removeHandler(h)
    terminal = logging.StreamHandler()
    terminal.setFormatter(_RedactingFormatter(_FORMAT, datefmt="%H:%M:%S"))
    terminal._ciea_terminal = True  # type: ignore[attr-defined]
    if not verbose:
        terminal.addFilter(_TerminalFilter())
    root.addHandler(terminal)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def log_to_file(path: str | Path, verbose: bool = False) -> Path:
    """Also writes every log line (ours, Ray's, Ray Train's, Ray Data's) to ``path``, the run
    log, and keeps Ray's own terminal handlers to warnings unless ``verbose``. Idempotent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path)
    handler.setFormatter(_RedactingFormatter(_FORMAT))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler._ciea_run_log = True  # type: ignore[attr-defined]
    # Ray and Ray Data configure their loggers at import: own terminal handlers, propagate off.
    for name in ("", "ray", "ray.data"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if getattr(h, "_ciea_run_log", False):
                lg.removeHandler(h)
                h.close()
        lg.addHandler(handler)
        if name and not verbose:
            for h in lg.handlers:
                if type(h).__name__ == "PlainRayHandler":  # Ray's terminal handler
                    h.setLevel(logging.WARNING)
                    if not any(isinstance(f, _RayDataNoise) for f in h.filters):
                        h.addFilter(_RayDataNoise())
    return path


#: The longest ``--config`` file read (a config is a few KiB; ``/dev/zero`` is not one).
MAX_CONFIG_BYTES = 4 * 1024 * 1024


class ConfigYAMLError(ValueError):
    """A config's YAML that is refused before it is used (aliases, nesting too deep)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*name`` lets a few lines expand into gigabytes
    (the "billion laughs") or a structure that contains itself; a config writes values out."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ConfigYAMLError("YAML aliases (*name) are not accepted in a config: write the value out")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """``text`` parsed as a config's YAML (safe types only, no aliases).

    Raises:
        ConfigYAMLError: an alias, or nesting too deep to parse.
        yaml.YAMLError: not YAML.
    """
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506  (a SafeLoader subclass)
    except RecursionError:
        raise ConfigYAMLError("nested too deep") from None


def _yaml_problem(e: Exception) -> str:
    """What is wrong with some YAML, without the text around it (which may hold a secret)."""
    if isinstance(e, ConfigYAMLError):
        return str(e)
    problem = getattr(e, "problem", None) or type(e).__name__
    return " ".join(str(problem).split())[:120]


def read_config_file(path: str, prefix: str) -> Any:
    """One ``--config`` file's YAML. Exits with one line (``prefix``: ``ciea embed:`` or
    ``invalid config:``) naming the file and the fix when it cannot be read, is too large,
    is not UTF-8 or not YAML — never quoting its text."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise SystemExit(f"{prefix} --config {path}: cannot read it as YAML ({e.strerror or type(e).__name__}); "
                         "pass a readable YAML file of config keys") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise SystemExit(f"{prefix} --config {path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, not a config; pass "
                         "a YAML file of config keys")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"{prefix} --config {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        return load_yaml(text)
    except (yaml.YAMLError, ConfigYAMLError) as e:
        raise SystemExit(f"{prefix} --config {path}: cannot read it as YAML ({_yaml_problem(e)}); pass a readable "
                         "YAML file of config keys") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "variants=[ciea,marvel]"]`` → nested dict (values parsed as YAML).

    Raises:
        SystemExit: one line naming the key (never the value): no ``=``, an empty key part,
            a value that is not YAML, or a key under one an earlier pair set to a value.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            shown = pair if not looks_secret(pair) and redact_text(pair) == pair else MASK
            raise SystemExit(f"--set {shown!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        key, value = pair.split("=", 1)
        *parents, leaf = parts = key.split(".")
        if not all(part.strip() for part in parts):
            raise SystemExit(f"--set {key}=…: {key!r} is not a config key (an empty part between dots); e.g. "
                             "--set train.epochs=3")
        try:
            parsed = load_yaml(value)
        except (yaml.YAMLError, ConfigYAMLError) as e:
            raise SystemExit(f"--set {key}=…: the value is not valid YAML ({_yaml_problem(e)}); quote text, e.g. "
                             f"--set \"{key}='…'\"") from None
        node = out
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                above = ".".join(parents[: i + 1])
                raise SystemExit(f"--set {key}=…: {above} was set to a value by an earlier --set, so it has no key "
                                 f"{parts[i + 1]!r}; set {above} or its keys, not both")
        node[leaf] = parsed
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


#: Every job's config model (``module:class``) by the job's name, as a pipeline file's
#: ``jobs:`` section names it (``mine_negatives`` is taken for ``mine-negatives``).
JOB_CONFIGS = {
    "ingest": "jobs.ingest:IngestJobConfig", "train": "pipelines.train.config:TrainJobConfig",
    "pretrain-vision": "pipelines.train.config:TrainJobConfig",
    "compare": "pipelines.train.compare:CompareConfig", "mine-negatives": "jobs.mine_negatives:MineJobConfig",
    "embed": "jobs.embed:EmbedJobConfig", "reindex": "jobs.reindex:ReindexJobConfig",
    "evaluate": "pipelines.query.config:EvaluateConfig", "search": "pipelines.query.search_run:SearchConfig",
    "sql": "pipelines.query.sql:SqlConfig", "serve": "pipelines.web.server:ServeConfig", "demo": "jobs.demo:DemoConfig",
}


@functools.cache
def job_keys() -> frozenset[str]:
    """Every top-level key that some job's config takes (imports every job's config: only
    asked when a pipeline file shares a key the running job lacks)."""
    keys: set[str] = set()
    for where in JOB_CONFIGS.values():
        module, name = where.split(":")
        keys |= set(getattr(importlib.import_module(module), name).model_fields)
    return frozenset(keys)


def job_view(data: dict[str, Any], job: str, model: type[BaseModel], where: str) -> dict[str, Any]:
    """A pipeline file as ``job`` reads it: its shared top-level keys deep-merged with
    ``jobs.<job>`` (the job's own section wins); other jobs' sections are ignored, and so is
    a shared key this job lacks but another job takes. A file without ``jobs:`` is returned
    as it is.

    Raises:
        SystemExit: one line naming the key: a shared key no job takes, a section of no job.
    """
    if "jobs" not in data:
        return data
    sections = data["jobs"] or {}
    if not isinstance(sections, dict):
        raise SystemExit(f"invalid config: {where}: jobs must map job names to their keys, e.g. "
                         "jobs: {embed: {encode: {batch_size: 128}}}")
    for name in sections:
        if str(name).replace("_", "-") not in JOB_CONFIGS:
            raise SystemExit(f"invalid config: {where}: jobs.{name} is no job; the jobs are {', '.join(JOB_CONFIGS)}")
    own = [name for name in sections if str(name).replace("_", "-") == job]
    if len(own) > 1:
        raise SystemExit(f"invalid config: {where}: jobs.{own[0]} and jobs.{own[1]} are the same job; keep one")
    section = (sections[own[0]] or {}) if own else {}
    if not isinstance(section, dict):
        raise SystemExit(f"invalid config: {where}: jobs.{own[0]} must map config keys to values")
    shared = {k: v for k, v in data.items() if k != "jobs"}
    for key in shared:
        if key not in model.model_fields and key not in job_keys():
            near = difflib.get_close_matches(str(key), sorted(job_keys()), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SystemExit(f"invalid config: {where}: {key!r} is no job's config key ({hint}a key of one job "
                             "goes under jobs.<job>)")
    return deep_merge({k: v for k, v in shared.items() if k in model.model_fields}, section)


def _config_paths(paths: str | Sequence[str] | None) -> list[str]:
    return [paths] if isinstance(paths, str) else list(paths or [])


def _read_config(path: str, job: str | None, model: type[BaseModel]) -> dict[str, Any]:
    """One ``--config`` file, as ``job`` reads it (:func:`job_view`)."""
    data = read_config_file(path, "invalid config:")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SystemExit(f"invalid config: --config {path}: expected config keys (a YAML mapping) at the top level")
    return job_view(data, job, model, f"--config {path}") if job else data


def load_config(model: type[BaseModel], paths: str | Sequence[str] | None, overrides: list[str],
                base: dict[str, Any], *, job: str | None = None) -> BaseModel:
    """Builds the typed job config from preset defaults ← YAML files (later ones win) ←
    ``--set`` overrides. With ``job`` (its name, e.g. ``embed``) a file may be a pipeline
    file: shared keys plus a ``jobs:`` section per job (:func:`job_view`).

    Exits with every validation error listed (field, value, message) before anything runs.
    """
    data = dict(base)
    for path in _config_paths(paths):
        data = deep_merge(data, _read_config(path, job, model))
    data = deep_merge(data, parse_overrides(overrides))
    odd = _non_finite(data)
    if odd is not None:
        raise SystemExit(f"invalid config: {odd[0]}: {odd[1]} is not a number a setting can hold; give a finite "
                         "number")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # A rule over the whole config (no field) names its keys itself: echoing the whole
        # input would bury the fix.
        lines = [f"{redact_text('.'.join(map(str, err['loc'])))}: {_message(err)} ({_shown(err)})" if err["loc"]
                 else _message(err).removeprefix("Value error, ") for err in e.errors()]
        if len(lines) == 1:
            raise SystemExit(f"invalid config: {lines[0]}") from None
        raise SystemExit("invalid config:\n" + "\n".join(f"  {line}" for line in lines)) from None


def _non_finite(node: Any, at: str = "") -> tuple[str, str] | None:
    """The dotted key and YAML spelling of the first infinite or NaN number in a raw config
    (``.inf``, ``1e999``): no setting means "unbounded" by it, and pydantic takes it as a float."""
    if isinstance(node, dict):
        for k, v in node.items():
            found = _non_finite(v, f"{at}.{k}" if at else str(k))
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _non_finite(v, f"{at}.{i}" if at else str(i))
            if found:
                return found
    elif isinstance(node, float) and not math.isfinite(node):
        return at or "the config", ".nan" if math.isnan(node) else (".inf" if node > 0 else "-.inf")
    return None


def _hidden(err: Any) -> bool:
    """Whether an error's input may be a secret: object-store settings (a credential by
    mistake) and any field whose name looks secret-bearing. Its value is never shown."""
    loc = [str(part) for part in err["loc"]]
    return "storage_options" in loc or any(looks_secret(part) for part in loc)


def _message(err: Any) -> str:
    msg = str(err["msg"])
    value = err.get("input")
    if _hidden(err) and isinstance(value, str) and value:
        msg = msg.replace(value, MASK)  # a validator that quotes its input
    return redact_text(msg)


def _shown(err: Any) -> str:
    if _hidden(err) or _holds_secret(err.get("input")):
        return "value not shown"
    return f"got {redact(err.get('input'))!r}"


#: ``name=value`` inside a text (a connection string ``AccountName=a;AccountKey=…``, a query
#: string ``…&sig=…``): the names :func:`_holds_secret` judges.
_PAIR = re.compile(r"(?:^|[\s;&?,'\"{(])([A-Za-z][A-Za-z0-9_.-]*)\s*=")


def _holds_secret(value: Any) -> bool:
    """Whether a raw config value carries a credential anywhere inside it: a key that looks
    secret-bearing, or a ``name=value`` pair whose name does (``AccountKey=``,
    ``SharedAccessSignature=``, ``sig=``). (A URL's userinfo is masked by ``redact``.)"""
    if isinstance(value, dict):
        return any(looks_secret(k) or _holds_secret(k) or _holds_secret(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_secret(v) for v in value)
    if isinstance(value, str):
        return any(looks_secret(m.group(1)) for m in _PAIR.finditer(value))
    return False


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
             log_to_driver: bool = True, log_file: str | Path | None = None, **kwargs: Any) -> bool:
    """Joins or starts Ray unless this process already has it; True if this call did.

    Inside ``ray job submit`` (``RAY_ADDRESS`` is set) or with ``address`` it joins that
    cluster: a local CPU count or temp dir would not match it, and ``ray.init`` would fail
    to find the node. Otherwise it starts a local Ray with its session files in
    ``temp_dir`` (default: a new short ``/tmp/ray-*``; Ray's unix sockets need a short path)
    and token authentication off, so nothing is written to ``~/.ray``.

    Ray's and Ray Data's log lines then go to the run log, ``log_file`` (default: ``ciea.log``
    in the session's log folder), not the terminal: :func:`log_to_file`.
    """
    import os
    import tempfile

    import ray

    if ray.is_initialized():
        return False
    verbose = logging.getLogger().level <= logging.DEBUG
    common = {"include_dashboard": False, "log_to_driver": log_to_driver, "configure_logging": False}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **common)
        _announce_run_log(log_file, verbose)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if temp_dir:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
    else:
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus, _temp_dir=temp_dir, **common, **kwargs)
    _announce_run_log(log_file, verbose)
    return True


def _announce_run_log(log_file: str | Path | None, verbose: bool) -> None:
    import tempfile

    import ray
    import ray.data  # noqa: F401  (configures its logger at import; adjust it after)

    if log_file is None:
        try:  # the session folder holds Ray's own logs: keep ours beside them
            session = ray._private.worker._global_node.get_session_dir_path()
        except AttributeError:
            session = tempfile.mkdtemp(prefix="ciea-")
        log_file = Path(session) / "logs" / "ciea.log"
    path = log_to_file(log_file, verbose)
    logging.getLogger(__name__).info("Ray's own log lines: %s", path)


def yaml_str(value: str) -> str:
    """``value`` as a single-quoted YAML scalar, so a flag's text stays a string after
    ``--set`` parsing (a path like ``2024``, a name like ``on``)."""
    return "'" + value.replace("'", "''") + "'"


def flag_overrides(args: Any, flags: dict[str, str], storage_key: str | None = None) -> list[str]:
    """Dotted ``key=value`` overrides for the flags given on the command line.

    ``flags`` maps argparse attributes to config keys; numbers stay numbers, text is quoted
    (:func:`yaml_str`). With ``storage_key`` (:data:`STORAGE`, the top-level
    ``storage_options`` of every job) each ``--storage-option KEY=VALUE`` lands under it.
    Callers append their own extras and the user's ``--set`` pairs after these, so ``--set``
    wins.
    """
    out: list[str] = []
    for attr, key in flags.items():
        value = getattr(args, attr)
        if value is not None:
            out.append(f"{key}={value}" if isinstance(value, (int, float)) else f"{key}={yaml_str(value)}")
    if storage_key:
        for pair in getattr(args, "storage_option", None) or []:
            if "=" not in pair:
                raise SystemExit(f"--storage-option {pair!r}: expected KEY=VALUE, e.g. AWS_REGION=us-east-1")
            key, value = pair.split("=", 1)
            out.append(f"{storage_key}.{key}={yaml_str(value)}")
    return out


def refuse_secrets(prog: str, config_paths: str | Sequence[str] | None, overrides: list[str],
                   storage_key: str | None = None) -> None:
    """Refuses secrets in the config files (every job's section of a pipeline file too) and
    overrides *before* the config is parsed, so that no validation error echoes one. Exits
    (one line naming the key, never the value) on:

    - a storage option that is not a backend's non-secret setting (every mapping named
      ``storage_options`` at any depth, old spellings included, and ``storage_key``, dotted):
      :func:`pipelines.store.storage.check_storage_option`;
    - any other key that looks secret-bearing (:func:`pipelines.store.secrets.looks_secret`);
    - a value with a URL carrying credentials (``user:password@``, a signature parameter).
    """
    sources: list[Any] = []
    for path in _config_paths(config_paths):
        data = read_config_file(path, f"{prog}:")  # a YAML error quotes the file's text: not shown
        sources.append({} if data is None else data)
    storage_at = tuple(storage_key.split(".")) if storage_key else None
    try:
        parsed = parse_overrides(overrides)
    except SystemExit as e:
        raise SystemExit(f"{prog}: {e.code}") from None
    try:
        for data in [*sources, parsed]:
            _check_secrets(data, (), storage_at)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None


def _check_secrets(node: Any, at: tuple[str, ...], storage_at: tuple[str, ...] | None) -> None:
    """Walks a raw config: raises ValueError naming the first secret's dotted key."""
    from pipelines.store.storage import check_storage_option, env_hint

    where = ".".join(at)
    if isinstance(node, dict):
        is_storage = bool(at) and (at[-1] == "storage_options" or at == storage_at)
        for key, value in node.items():
            if is_storage:
                try:
                    check_storage_option(str(key), value)
                except ValueError as e:
                    raise ValueError(f"{where}.{str(e).removeprefix('storage_options.')}") from None
            elif looks_secret(key) and not isinstance(value, bool):  # a flag says whether, never what
                raise ValueError(f"{'.'.join((*at, str(key)))} looks like a credential; credentials are read from "
                                 f"the environment only, never from the config. Remove it and {env_hint(str(key))}.")
            else:
                _check_secrets(value, (*at, str(key)), storage_at)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_secrets(value, (*at, str(i)), storage_at)
    elif isinstance(node, str) and redact_text(node) != node:
        raise ValueError(f"{where or 'the config'} holds a URL with credentials in it (user:password@ or a "
                         f"signature/token parameter); give it without them and put the credentials in the "
                         f"environment")
    elif isinstance(node, str) and _holds_secret(node):
        raise ValueError(f"{where or 'the config'} holds a credential (a secret-looking name=value pair such as "
                         "AccountKey=, SharedAccessSignature= or sig=, as in a connection string); credentials are "
                         "read from the environment only, never from the config: remove it")


# ---------------------------------------------------------------------------------------
# The job shell: shared flags → the typed config; Ray, spelled one way
# ---------------------------------------------------------------------------------------


class RaySettings(BaseModel):
    """Where a job's Ray runs: the ``ray`` section of every job config that starts Ray."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="Ray cluster address; default: start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="local Ray: CPUs to use (default: all)")
    temp_dir: str | None = Field("/tmp/ciea-ray", description="local Ray: session files (keep the path short; "
                                                              "null: a new /tmp/ray-*)")
    object_store_mb: int | None = Field(
        None, ge=64, description="local Ray: object store size (MiB); default Ray's (30% of RAM). "
        "Ray Data keeps in-flight blocks within it")


#: ``--ray-*`` flags → ``ray.*`` keys.
RAY_FLAGS = {"ray_address": "ray.address", "num_cpus": "ray.num_cpus", "ray_temp_dir": "ray.temp_dir"}


def job_parser(prog: str, doc: str | None, config: type[BaseModel] | None = None, *,
               presets: dict[str, Any] | None = None, default_preset: str | None = None,
               preset_help: str = "defaults to start from", storage: str | None = None, ray: bool = False,
               progress: str | None = "no progress bar (progress=false)", set_example: str = "",
               verbose: bool = True) -> argparse.ArgumentParser:
    """A job's parser with the flags every job spells the same way, in one group:
    ``--preset``, ``--config`` (repeatable: later files win; a file may be a pipeline file,
    :func:`job_view`), ``--storage-option`` (into ``storage``: :data:`STORAGE`), the Ray flags
    (``--ray-address``, ``--num-cpus``, ``--ray-temp-dir``), ``--no-progress``, ``--set`` and
    ``-v``. The job adds its own flags; ``--help`` ends with every config key and default.
    :func:`parse_job_config` turns the result into the typed config."""
    epilog = None
    if config is not None:
        epilog = "config keys (YAML file or --set KEY=VALUE), with defaults:\n" + "\n".join(config_keys(config))
    p = argparse.ArgumentParser(prog=prog, description=doc, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("options every job shares")
    if presets:
        g.add_argument("--preset", choices=sorted(presets), default=default_preset, help=preset_help)
    name = config.__name__ if config is not None else "config"
    g.add_argument("--config", action="append", default=[],
                   help=f"YAML file with {name} fields" + (" (overrides the preset)" if presets else "")
                        + ", or a pipeline file (shared keys + jobs.<job>); repeatable, later files win")
    if storage:
        g.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help=f"object-store setting, repeatable, e.g. AWS_REGION=eu-west-1 ({storage}; never "
                            "credentials: those come from the environment)")
    if ray:
        g.add_argument("--ray-address", help="connect to this Ray cluster instead of starting one (ray.address)")
        g.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (ray.num_cpus)")
        g.add_argument("--ray-temp-dir", help="session folder of the local Ray (ray.temp_dir; keep it short)")
    if progress:
        g.add_argument("--no-progress", action="store_true", help=progress)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key" + (f", e.g. --set {set_example}" if set_example else "")
                        + " (repeatable)")
    if verbose:
        g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def job_overrides(args: argparse.Namespace, flags: dict[str, str], *, storage: str | None = None,
                  extra: list[str] | None = None, progress_key: str = "progress") -> list[str]:
    """The dotted overrides of a job's command line: its own ``flags`` (argparse attribute →
    config key), the storage options, the Ray flags, ``extra`` pairs, ``--no-progress``, and
    the user's ``--set`` pairs last, so ``--set`` wins."""
    ray = {a: k for a, k in RAY_FLAGS.items() if hasattr(args, a)}
    out = flag_overrides(args, {**flags, **ray}, storage) + list(extra or [])
    if getattr(args, "no_progress", False):
        out.append(f"{progress_key}=false")
    return out + list(args.set)


def parse_job_config(prog: str, model: type[BaseModel], args: argparse.Namespace, overrides: list[str], *,
                     storage: str | None = None, presets: dict[str, Any] | None = None) -> Any:
    """The typed config of a parsed command line: preset defaults ← ``--config`` YAML files
    (a pipeline file read as the job ``prog`` names: :func:`job_view`) ← overrides. Secrets
    are refused first (:func:`refuse_secrets`), so no error echoes one; every validation
    error is listed before anything runs (``SystemExit``)."""
    refuse_secrets(prog, args.config, overrides, storage)
    base = presets[args.preset] if presets else {}
    cfg = load_config(model, args.config, overrides, base, job=prog.removeprefix("ciea "))
    _refuse_file_root(prog, cfg)
    return cfg


def _refuse_file_root(prog: str, cfg: Any) -> None:
    """A local data root (``root``, or ``<section>.root``: ``data.root``) that names a file: one line, before
    anything runs (an ingest would fail deep in Delta, a reader would look below the file)."""
    from pipelines.store.storage import is_remote

    holders = [("root", cfg)] + [(f"{name}.root", getattr(cfg, name)) for name in type(cfg).model_fields
                                 if isinstance(getattr(cfg, name), BaseModel)]
    for key, holder in holders:
        root = getattr(holder, "root", None)
        if isinstance(root, str) and root and not is_remote(root):
            path = Path(root.removeprefix("file://")).expanduser()
            if path.exists() and not path.is_dir():
                raise SystemExit(f"{prog}: the data root {root} is a file, not a folder ({key}): point --root at a "
                                 "folder (`ciea ingest` creates it)")


def job_logging(verbose: bool) -> None:
    """:func:`setup_logging` for a job: our lines on the terminal, Ray's in the run log
    once Ray starts (:func:`init_ray`)."""
    setup_logging(verbose)


def ray_up() -> bool:
    """Whether this process runs Ray (without importing it when it does not)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def start_ray(settings: RaySettings, log_to_driver: bool = True, progress: bool = True) -> bool:
    """:func:`init_ray` with a job's ``ray`` settings; True if this call joined or started Ray.
    With ``progress`` off no Ray Data bar reaches the terminal (:func:`quiet_ray_data`)."""
    extra = {"object_store_memory": settings.object_store_mb * 1024 * 1024} if settings.object_store_mb else {}
    started = init_ray(address=settings.address, num_cpus=settings.num_cpus, temp_dir=settings.temp_dir,
                       log_to_driver=log_to_driver, **extra)
    quiet_ray_data(progress)
    return started


def quiet_ray_data(progress: bool) -> None:
    """Under ``--no-progress``, turns Ray Data's progress bars off for the whole run: also
    those Ray Data draws while it plans a read ("Parquet dataset sampling" of a Delta
    table), outside any stage's own switch."""
    if progress:
        return
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def ray_owned() -> Iterator[None]:
    """Shuts down, on the way out, a Ray that this process did not run on the way in."""
    had = ray_up()
    try:
        yield
    finally:
        if not had and ray_up():
            import ray

            ray.shutdown()


class RayCluster:
    """Ray as a job's settings say, started only when a run asks for it
    (``pipelines.index.build.RayAccess``)."""

    def __init__(self, settings: RaySettings, log_to_driver: bool = True, progress: bool = True) -> None:
        self.settings = settings
        self.log_to_driver = log_to_driver
        self.progress = progress

    @property
    def remote(self) -> bool:
        """A cluster to join (``ray.address``, or ``RAY_ADDRESS`` inside ``ray job submit``)."""
        return bool(self.settings.address or os.environ.get("RAY_ADDRESS"))

    def resources(self) -> dict[str, float]:
        """Ray's resources once it is up; before, what a local start would find here
        (``ray.num_cpus`` or this machine's CPUs, its GPUs), without starting it."""
        if ray_up():
            import ray

            return ray.cluster_resources()
        import torch

        return {"CPU": float(self.settings.num_cpus or len(os.sched_getaffinity(0))),
                "GPU": float(torch.cuda.device_count())}

    def start(self) -> dict[str, float]:
        import ray

        start_ray(self.settings, self.log_to_driver, self.progress)
        return ray.cluster_resources()


def preset_defaults(model: type[BaseModel], presets: dict[str, Any] | None = None,
                    preset: str | None = None) -> Any:
    """The config a job builds from a preset alone (no file, no flags)."""
    return load_config(model, None, [], presets[preset] if presets and preset else {})


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """A config dump as dotted keys; lists and empty dicts stay whole."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _yaml_value(value: Any) -> str:
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value) == value  # a path stays a string as it is
        except yaml.YAMLError:
            plain = False
        return value if plain else yaml_str(value)
    return json.dumps(value)  # numbers, booleans, null, lists: JSON is YAML


def command_args(cfg: BaseModel, defaults: BaseModel, flags: dict[str, str], *, progress_key: str = "progress",
                 skip: tuple[str, ...] = (), always: tuple[str, ...] = ()) -> list[str]:
    """The command line a user would type for ``cfg``: the job's own flag where it has one,
    ``--no-progress``, and ``--set KEY=VALUE`` for the rest — only what differs from
    ``defaults`` (the job's preset), and the keys in ``always``. Keys under ``skip`` are left
    to the caller (flags that build a list, like ``--variant``). Parsing the result gives
    ``cfg`` back."""
    want = _leaves(cfg.model_dump(mode="json"))
    have = _leaves(defaults.model_dump(mode="json"))
    flag_of = {key: attr for attr, key in flags.items()}
    argv: list[str] = []
    sets: list[str] = []
    for key, value in want.items():
        if (key in have and have[key] == value and key not in always) \
                or any(key == s or key.startswith(f"{s}.") for s in skip):
            continue
        if key == progress_key and value is False:
            argv.append("--no-progress")
        elif key in flag_of and value is not None:
            argv += [f"--{flag_of[key].replace('_', '-')}", str(value)]
        else:
            sets += ["--set", f"{key}={_yaml_value(value)}"]
    return argv + sets
