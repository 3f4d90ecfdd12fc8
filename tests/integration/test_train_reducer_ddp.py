"""The sparse-embedding gradient reducer across two real gloo ranks (``torch.multiprocessing``
processes): every rank gets the dense mean gradient; and its single-rank rules. Here rather
than in the unit tier, which starts no process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ciea_model.processor import Document, TrainExample
from pipelines.train.gradients import GradientReducer


def _reducer_batches(rank: int, step: int):
    """Per rank and step, a different mix: rank 0 of step 0 has image documents (so L_comp
    and the vision side); rank 1 text only; step 1 swaps texts so other rows are touched."""
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 40 * step, 0))
    words = [["a red circle", "a blue square", "lanterns in the harbor"],
             ["green forest path", "white desert cross", "boats at dawn"]][step]
    if rank == 0:
        docs = [Document(f"img-{step}-1", "image", caption=words[0], image=img),
                Document(f"img-{step}-2", "image", caption=words[1], image=img)]
        return [TrainExample("q1", f"{words[0]} photo", docs[0]), TrainExample("q2", f"{words[1]} now", docs[1])]
    doc = Document(f"txt-{step}", "text", text=words[2])
    return [TrainExample("q3", f"{words[2]} tonight", doc)]


def _reducer_worker(rank: int, world: int, init_file: str, out_dir: str, tok_dir: str) -> None:
    from ciea_model import create_model_and_processor
    from ciea_model.presets import tiny_config
    from ciea_model.training import compute_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Two copies of one model: the reference averages dense gradients in one flat
        # all-reduce (what DDP computes); the other goes through GradientReducer with its
        # embedding switched to sparse gradients (min_rows=1: the tiny vocabulary is small).
        (ref, processor), (model, _) = (create_model_and_processor(tiny_config("ciea", tok_dir), pretrained=False,
                                                                   seed=0) for _ in range(2))
        reducer = GradientReducer(model, world, min_rows=1)
        emb = model.text.model.get_input_embeddings()
        result = {"sparse": [emb.sparse, ref.text.model.get_input_embeddings().sparse], "steps": []}
        for step in range(2):
            batch = processor.collate_training(_reducer_batches(rank, step))
            for m in (ref, model):
                m.eval()  # no dropout: both copies compute the same numbers
                m.zero_grad(set_to_none=True)
                compute_loss(m, batch, gather=True).loss.backward()
            result["steps"].append({"sparse_grad": bool(emb.weight.grad.is_sparse)})
            params = [p for p in ref.parameters() if p.requires_grad]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            reducer.reduce()
            got = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
            touched = emb.weight.grad.ne(0).any(dim=1)
            result["steps"][-1].update(
                max_diff=float((got - flat).abs().max()), ref_norm=float(flat.norm()),
                dense=all(not p.grad.is_sparse for p in model.parameters() if p.requires_grad),
                touched_rows=int(touched.sum()), vocab=int(touched.numel()))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_gradient_reducer_matches_dense_averaging_across_ranks(tmp_path, tokenizer_dirs):
    """Two gloo ranks with different batches, two steps touching different vocabulary
    rows: the sparse-embedding reducer gives every rank the dense mean gradient."""
    if not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    mp.spawn(_reducer_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(tokenizer_dirs["t5"])),
             nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["sparse"] == [True, False]
        for s in r["steps"]:
            assert s["sparse_grad"], "the embedding's backward produced a sparse gradient"
            assert s["dense"], "the optimiser gets dense gradients"
            assert s["ref_norm"] > 0 and s["max_diff"] < 1e-6 * max(1.0, s["ref_norm"]), s
            # Only the rows some rank looked up carry gradient (the last step's are cleared).
            assert 0 < s["touched_rows"] < s["vocab"]
    assert r0["steps"] == r1["steps"]


def test_gradient_reducer_single_rank_densifies_and_refuses_stale_grads(tokenizer_dirs):
    from ciea_model import create_model_and_processor
    from ciea_model.presets import tiny_config
    from ciea_model.training import compute_loss

    (ref, processor), (model, _) = (create_model_and_processor(tiny_config("ciea", str(tokenizer_dirs["t5"])),
                                                               pretrained=False, seed=0) for _ in range(2))
    reducer = GradientReducer(model, world=1, min_rows=1)
    for step in range(2):
        batch = processor.collate_training(_reducer_batches(0, step) + _reducer_batches(1, step))
        for m in (ref, model):
            m.eval()
            m.zero_grad(set_to_none=True)
            compute_loss(m, batch).loss.backward()
        reducer.reduce()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if q.grad is None:
                continue
            assert not p.grad.is_sparse, name
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(RuntimeError, match="set_to_none=True"):
        reducer.reduce()  # last step's reduced gradients were never cleared
