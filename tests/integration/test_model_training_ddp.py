"""``compute_loss(gather=True)`` across two gloo processes whose batches differ: one rank
has complementary queries and image documents, the other only text. Before the fix the
ranks made different collective calls and hung; now both finish with finite losses and
identical gradients after DDP-style averaging."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, tok_dir: str) -> None:
    torch.set_num_threads(1)
    from PIL import Image

    from ciea_model import Document, TrainExample, create_model_and_processor
    from ciea_model.presets import tiny_config
    from ciea_model.training import compute_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, processor = create_model_and_processor(tiny_config("ciea", tok_dir), pretrained=False, seed=0)
        model.eval()  # no dropout: both ranks' numbers are reproducible
        if rank == 0:
            img = Image.new("RGB", (32, 32), (200, 0, 0))
            docs = [Document("img-1", "image", caption="a circle", image=img),
                    Document("img-2", "image", caption="a square", image=img)]
            examples = [TrainExample("q1", "a red circle", docs[0]), TrainExample("q2", "a blue square", docs[1])]
        else:
            docs = [Document("txt-1", "text", text="lanterns in the harbor")]
            examples = [TrainExample("q3", "harbor lanterns", docs[0])]
        batch = processor.collate_training(examples)
        out = compute_loss(model, batch, gather=True)
        out.loss.backward()
        # A rank whose batch has no images leaves the vision side without .grad; DDP
        # would all-reduce zeros for it, so do the same.
        grads = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters() if p.requires_grad
        ])
        dist.all_reduce(grads)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "loss": float(out.loss), "comp_queries": out.comp_queries,
            "grad_norm": float(grads.norm()), "grad_finite": bool(torch.isfinite(grads).all()),
        }))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_compute_loss_gathers_across_uneven_ranks(tmp_path, tokenizer_dirs):
    if not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(tokenizer_dirs["t5"])), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["comp_queries"] == 2 and r1["comp_queries"] == 0
    for r in (r0, r1):
        assert r["grad_finite"] and r["grad_norm"] > 0
        assert torch.isfinite(torch.tensor(r["loss"]))
    assert r0["grad_norm"] == pytest.approx(r1["grad_norm"])
