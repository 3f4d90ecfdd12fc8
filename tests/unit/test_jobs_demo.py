"""``ciea demo`` runs every stage on a typed config and prints the command a user would type
for it: parsing that command with the job's own parser gives back the very same config."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from jobs import demo, embed, evaluate, ingest, mine_negatives, train

JOBS = {"ingest": ingest, "train": train, "mine-negatives": mine_negatives, "embed": embed, "evaluate": evaluate}


def _calls(cfg: demo.DemoConfig, out: Path) -> list[demo.JobCall]:
    data, runs, db = out / "data", out / "train", out / "lancedb"
    s1 = str(runs / "ciea-s1" / "model")
    return [
        demo.ingest_call(cfg, data),
        demo.train_call(cfg, "ciea", data, runs, 1, None),
        demo.mine_call(cfg, s1, data, runs / "ciea-negatives"),
        demo.train_call(cfg, "text-only", data, runs, 2, out / "vision.safetensors", s1, runs / "ciea-negatives",
                        str(Path(s1) / "tokenizer")),
        demo.embed_call(cfg, "text-only", s1, data, db, out),
        demo.evaluate_call(cfg, data, db, out),
    ]


@pytest.mark.parametrize("argv", [
    ["--preset", "tiny", "--no-progress", "--set", "num_cpus=2"],
    ["--preset", "demo", "--variants", "ciea,marvel", "--set", "train.set=[train.lr=0.001]"],
])
def test_each_printed_command_parses_to_the_config_the_stage_runs(argv, tmp_path):
    cfg, _ = demo.parse_config([*argv, "--output-dir", str(tmp_path / "2024")])
    for call in _calls(cfg, tmp_path / "2024"):
        parsed, _ = JOBS[call.command].parse_config(shlex.split(shlex.join(call.args)))
        assert parsed == call.config, f"ciea {call.command} {shlex.join(call.args)}"


def test_printed_commands_name_what_the_stage_is(tmp_path):
    cfg, _ = demo.parse_config(["--preset", "tiny", "--output-dir", str(tmp_path)])
    ingest_, train1, mine, train2, embed_, evaluate_ = (shlex.join(c.args) for c in _calls(cfg, tmp_path))
    assert "--source synthetic" in ingest_ and "source.synthetic.num_image_docs=120" in ingest_
    assert "--preset tiny" in train1 and "--variant ciea" in train1 and "--stage 1" in train1
    assert "--stage 2" in train2 and "train.negatives=" in train2 and "train.init_from=" in train2
    assert "cpus_per_actor=0.5" in mine
    assert f"--db {tmp_path / 'lancedb'}" in embed_ and "--table text_only" in embed_
    assert "--variant bm25=fts:" in evaluate_ and "--split test" in evaluate_


def test_the_old_num_cpus_key_still_sets_the_demo_ray(tmp_path):
    cfg, _ = demo.parse_config(["--preset", "tiny", "--output-dir", str(tmp_path), "--set", "num_cpus=2"])
    assert cfg.ray.num_cpus == 2
    with pytest.raises(SystemExit, match="num_cpus"):
        demo.parse_config(["--preset", "tiny", "--output-dir", str(tmp_path), "--set", "num_cpus=1"])
