"""The command-line plumbing every job shares (``jobs/common.py``)."""

from __future__ import annotations

import argparse

import pytest

from jobs import common, embed, evaluate, reindex


def _args(**kw):
    return argparse.Namespace(**{"storage_option": [], **kw})


def test_flag_overrides_quote_text_keep_numbers_and_skip_unset():
    args = _args(root="2024", version=3, db=None, storage_option=["AWS_REGION=on"])
    out = common.flag_overrides(args, {"root": "input.root", "version": "input.version", "db": "output.db"},
                                "input.storage_options")
    assert out == ["input.root='2024'", "input.version=3", "input.storage_options.AWS_REGION='on'"]
    parsed = common.parse_overrides(out)
    assert parsed["input"]["root"] == "2024" and parsed["input"]["storage_options"]["AWS_REGION"] == "on"


def test_yaml_str_survives_quotes():
    assert common.parse_overrides([f"k={common.yaml_str(chr(39) + 'x')}"]) == {"k": "'x"}


def test_malformed_storage_option_names_the_fix():
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        common.flag_overrides(_args(storage_option=["AWS_REGION"]), {}, "input.storage_options")


@pytest.mark.parametrize("job", [embed, evaluate, reindex])
def test_jobs_refuse_credentials_without_echoing_them(job, tmp_path):
    argv = ["--storage-option", "AWS_SECRET_ACCESS_KEY=hunter2", "--root", str(tmp_path)]
    if job is not evaluate:
        argv += ["--checkpoint", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        job.main(argv)
    message = str(exc.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and "environment" in message
    assert "hunter2" not in message


def test_credentials_in_a_config_file_are_refused_too(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("input:\n  storage_options:\n    AWS_SESSION_TOKEN: abc123\n")
    with pytest.raises(SystemExit) as exc:
        common.refuse_secrets("ciea x", str(config), [], "input.storage_options")
    assert str(exc.value).startswith("ciea x: ") and "abc123" not in str(exc.value)


# --- the job shell: one parser of the shared flags, one RaySettings, typed runs ------------


@pytest.mark.parametrize("name", ["ingest", "embed", "reindex", "mine_negatives", "demo"])
def test_every_ray_job_spells_ray_the_same_way(name):
    import importlib

    job = importlib.import_module(f"jobs.{name}")
    argv = {"embed": ["--checkpoint", "ckpt"], "mine_negatives": ["--checkpoint", "c", "--output", "o"]}.get(name, [])
    cfg, _ = job.parse_config([*argv, "--ray-address", "ray://head:10001", "--num-cpus", "3",
                               "--ray-temp-dir", "/tmp/r"])
    assert cfg.ray == common.RaySettings(address="ray://head:10001", num_cpus=3, temp_dir="/tmp/r")
    assert type(cfg.ray) is common.RaySettings


@pytest.mark.parametrize("name", ["ingest", "embed", "reindex", "evaluate", "search", "serve", "sql", "train",
                                  "mine_negatives", "demo", "compare"])
def test_every_job_has_the_shared_flags(name):
    import importlib

    actions = {o for a in importlib.import_module(f"jobs.{name}")._parser()._actions for o in a.option_strings}
    assert {"--config", "--set"} <= actions


def test_old_top_level_ray_keys_still_work():
    from jobs.mine_negatives import MineConfig

    cfg = MineConfig.model_validate({"checkpoint": "c", "output": "o", "num_cpus": 2})
    assert cfg.ray.num_cpus == 2
    both = MineConfig.model_validate({"checkpoint": "c", "output": "o", "num_cpus": 2, "ray": {"num_cpus": 4}})
    assert both.ray.num_cpus == 4  # the new place wins


def test_command_args_give_the_config_back(tmp_path):
    argv = ["--checkpoint", str(tmp_path / "on"), "--root", "2024", "--table", "t", "--no-progress",
            "--set", "encode.batch_size=8", "--set", "write.commit_every_rows=100", "--storage-option",
            "AWS_REGION=eu-west-1", "--set", "preprocess.placement=tasks"]
    cfg, _ = embed.parse_config(argv)
    again = embed.command(cfg)
    assert embed.parse_config(again)[0] == cfg
    assert again[:2] == ["--root", "2024"] and "--batch-size" in again  # a job flag where there is one


def test_ray_cluster_reports_resources_without_starting_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = common.RayCluster(common.RaySettings(num_cpus=3))
    assert not cluster.remote and common.RayCluster(common.RaySettings(address="ray://h:1")).remote
    if not common.ray_up():  # unit tests run without Ray: it must stay that way
        assert cluster.resources()["CPU"] == 3.0
        assert not common.ray_up()


def test_reindex_job_runs_the_pipeline_function():
    # The job is a shell: its config is the run's plus Ray; the run lives in pipelines/.
    from pipelines.index.reindex import ReindexConfig

    assert issubclass(reindex.ReindexJobConfig, ReindexConfig)
    assert "ray" not in ReindexConfig.model_fields and "ray" in reindex.ReindexJobConfig.model_fields
