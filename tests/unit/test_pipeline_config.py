"""One name per user setting (issue 23): object-store settings are the top-level
``storage_options`` of every job that touches a store (older spellings still read), and one
pipeline file (shared keys + ``jobs.<name>``) configures every job."""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from jobs import cli, common
from pipelines.store.storage import move_legacy_keys

SENTINEL = "s3cr3t-Value-42"
#: The jobs that read or write an object store, and the arguments each needs besides a config.
STORAGE_JOBS = {
    "ingest": [], "train": [], "pretrain-vision": [], "mine-negatives": ["--checkpoint", "c", "--output", "o"],
    "embed": ["--checkpoint", "c"], "reindex": [], "evaluate": ["--variant", "a=table:db/t"],
    "search": ["a query"], "sql": ["SELECT 1"], "serve": ["--db", "d"],
}
#: Where each job read them before (what older configs still say).
OLD_SPELLING = {"ingest": "output", "train": "data", "embed": "input", "reindex": "input", "evaluate": "input",
                "search": "table", "serve": "input"}


def _job(name: str):
    return importlib.import_module(cli.COMMANDS[name][0])


def _parse(name: str, *argv: str) -> Any:
    return _job(name).parse_config([*STORAGE_JOBS.get(name, []), *argv])[0]


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _model(name: str) -> type[BaseModel]:
    module, cls = common.JOB_CONFIGS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _nested_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    out = []
    for f in model.model_fields.values():
        for t in (f.annotation, *getattr(f.annotation, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += [t, *_nested_models(t)]
    return out


# --- one key -------------------------------------------------------------------------------


def test_every_job_has_a_config_and_a_name_a_pipeline_file_can_use():
    assert set(common.JOB_CONFIGS) == set(cli.COMMANDS)
    assert all("jobs" not in _model(name).model_fields for name in common.JOB_CONFIGS)


@pytest.mark.parametrize("name", sorted(common.JOB_CONFIGS))
def test_storage_options_are_one_top_level_field(name):
    model = _model(name)
    assert ("storage_options" in model.model_fields) == (name in STORAGE_JOBS)
    inner = [m.__name__ for m in _nested_models(model) if "storage_options" in m.model_fields]
    assert not inner, f"{name}: storage_options also in {inner}: one field the user sets"


@pytest.mark.parametrize("name", sorted(STORAGE_JOBS))
def test_the_same_storage_yaml_and_flag_configure_every_job(name, tmp_path):
    config = _write(tmp_path, {"storage_options": {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://minio:9000"}})
    cfg = _parse(name, "--config", config, "--storage-option", "AWS_ALLOW_HTTP=true")
    assert cfg.storage_options == {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://minio:9000",
                                   "AWS_ALLOW_HTTP": "true"}


@pytest.mark.parametrize("name", sorted(OLD_SPELLING))
def test_the_old_spelling_still_works_and_the_new_place_wins(name, tmp_path):
    old = {OLD_SPELLING[name]: {"storage_options": {"AWS_REGION": "old", "AWS_ENDPOINT_URL": "http://old"}}}
    assert _parse(name, "--config", _write(tmp_path, old)).storage_options == {
        "AWS_REGION": "old", "AWS_ENDPOINT_URL": "http://old"}
    both = _parse(name, "--config", _write(tmp_path, {**old, "storage_options": {"AWS_REGION": "new"}}))
    assert both.storage_options == {"AWS_REGION": "new", "AWS_ENDPOINT_URL": "http://old"}  # key by key
    flag = _parse(name, "--config", _write(tmp_path, old), "--storage-option", "AWS_REGION=flag")
    assert flag.storage_options["AWS_REGION"] == "flag"


@settings(max_examples=80, deadline=None)
@given(old=st.dictionaries(st.sampled_from("abc"), st.text(max_size=3)),
       new=st.none() | st.dictionaries(st.sampled_from("abc"), st.text(max_size=3)),
       other=st.dictionaries(st.sampled_from(["root", "version"]), st.integers()))
def test_a_moved_key_merges_into_the_new_place_which_wins(old, new, other):
    data = {"input": {**other, "storage_options": old}, **({} if new is None else {"storage_options": new})}
    before = yaml.safe_dump(data)
    out = move_legacy_keys(data, {"input.storage_options": "storage_options"})
    assert out == {"input": other, "storage_options": {**old, **(new or {})}}
    assert yaml.safe_dump(data) == before  # the caller's dict is left alone
    assert move_legacy_keys(out, {"input.storage_options": "storage_options"}) == out  # nothing left to move


def test_moved_top_level_keys_still_land_in_their_section():
    assert move_legacy_keys({"num_cpus": 2}, {"num_cpus": "ray.num_cpus"}) == {"ray": {"num_cpus": 2}}
    assert move_legacy_keys({"num_cpus": 2, "ray": {"num_cpus": 4}}, {"num_cpus": "ray.num_cpus"}) == {
        "ray": {"num_cpus": 4}}
    assert move_legacy_keys("not a dict", {"num_cpus": "ray.num_cpus"}) == "not a dict"


# --- one file for the whole pipeline -------------------------------------------------------

PIPELINE = {
    "storage_options": {"AWS_REGION": "eu-west-1"},
    "ray": {"num_cpus": 3},
    "seeds": [1, 2],  # compare's: ignored by the others
    "jobs": {
        "embed": {"model": {"checkpoint": "runs/ckpt"}, "encode": {"batch_size": 8}},
        "train": {"train": {"epochs": 2}, "storage_options": {"AWS_ENDPOINT_URL": "http://minio:9000"}},
        "mine_negatives": {"checkpoint": "c", "output": "o"},
        "evaluate": {"storage_options": {"AWS_REGION": "us-east-1"}},
    },
}


def test_one_pipeline_file_configures_two_jobs(tmp_path):
    config = _write(tmp_path, PIPELINE)
    embed_cfg, _ = _job("embed").parse_config(["--config", config])
    train_cfg, _ = _job("train").parse_config(["--config", config])
    assert embed_cfg.storage_options == {"AWS_REGION": "eu-west-1"}
    assert (embed_cfg.model.checkpoint, embed_cfg.encode.batch_size, embed_cfg.ray.num_cpus) == ("runs/ckpt", 8, 3)
    assert train_cfg.storage_options == {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://minio:9000"}
    assert train_cfg.train.epochs == 2  # and no `ray` (train has none) nor `seeds`: another job's
    assert _job("mine-negatives").parse_config(["--config", config])[0].checkpoint == "c"  # underscore spelling
    assert _job("evaluate").parse_config(["--config", config, "--variant", "a=table:db/t"])[0].storage_options == {
        "AWS_REGION": "us-east-1"}  # its own section wins


def test_a_file_without_jobs_behaves_as_before(tmp_path):
    config = _write(tmp_path, {"ray": {"num_cpus": 3}})  # train has no `ray`: an error, as always
    with pytest.raises(SystemExit, match=r"ray: Extra inputs are not permitted"):
        _job("train").parse_config(["--config", config])


@pytest.mark.parametrize(("data", "named"), [
    ({"stroage_options": {"AWS_REGION": "x"}, "jobs": {}}, "'stroage_options' is no job's config key (did you "
                                                           "mean 'storage_options'?"),
    ({"jobs": {"embd": {}}}, "jobs.embd is no job"),
    ({"jobs": {"mine-negatives": {}, "mine_negatives": {}}}, "are the same job"),
    ({"jobs": ["embed"]}, "jobs must map job names"),
])
def test_a_pipeline_file_error_is_one_line_naming_the_key(data, named, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _job("mine-negatives").parse_config(["--config", _write(tmp_path, data)])
    message = str(exc.value)
    assert named in message and "\n" not in message and message.startswith("invalid config: --config ")


@pytest.mark.parametrize(("data", "named"), [
    ({"storage_options": {"AWS_SECRET_ACCESS_KEY": SENTINEL}, "jobs": {}}, "storage_options.AWS_SECRET_ACCESS_KEY"),
    ({"jobs": {"train": {"data": {"storage_options": {"password": SENTINEL}}}}},
     "jobs.train.data.storage_options.password"),  # the old spelling, in another job's section
    ({"jobs": {"embed": {"storage_options": {"AWS_REGION": f"https://u:{SENTINEL}@h"}}}},
     "jobs.embed.storage_options.AWS_REGION"),
])
def test_a_credential_anywhere_in_a_pipeline_file_is_refused_in_one_line(data, named, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _job("embed").main(["--checkpoint", "c", "--config", _write(tmp_path, data)])
    message = str(exc.value)
    assert message.startswith(f"ciea embed: {named} ") and "\n" not in message and SENTINEL not in message


def test_repeated_config_files_later_ones_win(tmp_path):
    shared = _write(tmp_path, PIPELINE, "shared.yaml")
    embed_yaml = _write(tmp_path, {"encode": {"batch_size": 16}, "storage_options": {"AWS_REGION": "ap-south-1"}},
                        "embed.yaml")
    cfg, _ = _job("embed").parse_config(["--config", shared, "--config", embed_yaml])
    assert (cfg.encode.batch_size, cfg.storage_options, cfg.model.checkpoint) == (16, {"AWS_REGION": "ap-south-1"},
                                                                                 "runs/ckpt")
    cfg, _ = _job("embed").parse_config(["--config", embed_yaml, "--config", shared])
    assert (cfg.encode.batch_size, cfg.storage_options) == (8, {"AWS_REGION": "eu-west-1"})


_REGION = st.none() | st.sampled_from(["r1", "r2", "r3"])


@settings(max_examples=60, deadline=None)
@given(files=st.lists(st.fixed_dictionaries({"shared": _REGION, "own": _REGION, "old": _REGION}), min_size=1,
                      max_size=3),
       flag=_REGION, set_=_REGION)
def test_precedence_files_in_order_then_the_flag_then_set_and_the_old_spelling_last(files, flag, set_):
    """Every place a region can be given, in the order the command line reads them: the last
    new-spelling one wins; an old spelling counts only where no new one is given; another
    job's section never counts; other keys of the shared settings survive."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--checkpoint", "c"]
        for i, f in enumerate(files):
            data: dict = {"jobs": {"embed": {}, "train": {"storage_options": {"AWS_REGION": "train-only"}}}}
            data["storage_options"] = {"AWS_ALLOW_HTTP": "true"} if i == 0 else {}
            if f["shared"]:
                data["storage_options"]["AWS_REGION"] = f["shared"]
            if f["own"]:
                data["jobs"]["embed"]["storage_options"] = {"AWS_REGION": f["own"]}
            if f["old"]:
                data["input"] = {"storage_options": {"AWS_REGION": f["old"]}}
            argv += ["--config", _write(Path(tmp), data, f"{i}.yaml")]
        argv += ["--storage-option", f"AWS_REGION={flag}"] if flag else []
        argv += ["--set", f"storage_options.AWS_REGION={set_}"] if set_ else []
        cfg, _ = _job("embed").parse_config(argv)
    new = [v for f in files for v in (f["shared"], f["own"]) if v] + [v for v in (flag, set_) if v]
    old = [f["old"] for f in files if f["old"]]
    expected = (new or old or [None])[-1]
    assert cfg.storage_options.get("AWS_REGION") == expected
    assert cfg.storage_options["AWS_ALLOW_HTTP"] == "true"


def test_the_documented_pipeline_file_configures_its_jobs(tmp_path):
    doc = (Path(__file__).parents[2] / "docs" / "cluster.md").read_text()
    example = doc.split("## One file for the whole pipeline", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "pipeline.yaml"
    config.write_text(example)
    for name, argv in {"ingest": [], "train": ["--preset", "paper", "--workers", "4"],
                       "embed": ["--checkpoint", "ckpt"], "evaluate": []}.items():
        cfg, _ = _job(name).parse_config(["--config", str(config), *argv])
        assert cfg.storage_options == {"AWS_REGION": "us-west-2"}, name
        assert "s3://ciea-data/webqa" in cfg.model_dump_json(), name
