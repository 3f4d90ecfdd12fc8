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
