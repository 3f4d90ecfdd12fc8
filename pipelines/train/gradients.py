"""Data-parallel gradient averaging for the Ray Train workers (:class:`GradientReducer`).

The model's encoders are methods (``encode_query`` / ``encode_documents``), not ``forward``,
so wrapping ``CIEAModel`` in ``DistributedDataParallel`` would sync nothing. We average
gradients ourselves: one all-reduce of the flattened gradients after the last micro-batch of
each optimiser step (token embeddings get sparse gradients, as in the in-process trainer,
and reduce only the rows some rank touched). Why not a DDP wrapper whose ``forward`` calls
``compute_loss``: (1) ``compute_loss`` already makes identical collective calls on every rank (candidates
gathered with gradient), and DDP's bucketed hooks would interleave their own all-reduces
with those — legal, but a second ordering to keep consistent; (2) text-only batches leave
the vision side unused, which DDP only tolerates with ``find_unused_parameters=True`` (a
graph walk per step); (3) gradient accumulation is then plain "all-reduce once per step",
with no ``no_sync`` contexts. A zero is reduced for a parameter without ``.grad``, exactly
what DDP does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ciea_model.training import SPARSE_EMBEDDING_MIN_ROWS, SparseEmbeddingGrads

__all__ = ["SPARSE_EMBEDDING_MIN_ROWS", "GradientReducer"]


class GradientReducer:
    """Averages gradients over data-parallel ranks, as DDP's reducer does, shaped by where
    a CPU step's time goes (the demo model, profiled per phase: BENCHMARKS.md).

    Token embeddings get sparse gradients through
    :class:`ciea_model.training.SparseEmbeddingGrads`, the same object the in-process
    trainer densifies its step with (one step, one code path): the backward keeps only the
    rows a batch touched. The union of the rows touched on any rank is agreed with one MAX
    all-reduce of per-row flags, only those rows travel in the gradient all-reduce, and the
    result is written into the persistent dense gradient whose other rows are zero. The
    optimiser, clipping and weight decay see exactly the dense gradient they saw before.
    With one rank this is :meth:`SparseEmbeddingGrads.densify`.

    Everything else is packed into one flat buffer, reduced in place in the same single
    all-reduce, and handed back as views of it (no copy back, no per-step allocation).
    A parameter without a gradient on a rank contributes zeros, as DDP's does, so every
    rank makes the same collective calls whatever its batch held.

    Args:
        model: the model; its large trainable ``nn.Embedding`` modules are switched to
            sparse gradients (forward results are unchanged).
        world: ranks to average over; 1 skips the collectives.
        min_rows: embeddings with fewer rows stay dense.
    """

    def __init__(self, model: torch.nn.Module, world: int, min_rows: int = SPARSE_EMBEDDING_MIN_ROWS) -> None:
        self.world = world
        self.embeddings = SparseEmbeddingGrads(model, min_rows)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.sparse = self.embeddings.params
        self.dense = [p for p in trainable if not self.embeddings.owns(p)]
        dtype = trainable[0].dtype if trainable else torch.float32
        device = trainable[0].device if trainable else torch.device("cpu")
        if any(p.dtype != dtype for p in trainable):
            raise ValueError("GradientReducer needs one parameter dtype; cast the model (model.float()) first")
        # Dense gradients plus the touched embedding rows; grown when a step touches more.
        self._flat = torch.empty(0, dtype=dtype, device=device)

    def reduce(self) -> None:
        """Replaces every ``.grad`` by its mean over ranks (dense tensors throughout)."""
        if any(p.grad is not None and p.grad.untyped_storage().data_ptr() == self._flat.untyped_storage().data_ptr()
               for p in self.dense[:1]) or self.embeddings.stale():
            raise RuntimeError("gradients still hold last step's reduced values: call "
                               "optimizer.zero_grad(set_to_none=True) before each step's backward")
        if self.world == 1:
            self.embeddings.densify()
            return
        local = [self.embeddings.local(p) for p in self.sparse]
        # The rows any rank touched: one small collective for all embedding matrices.
        flags = torch.cat([torch.zeros(p.shape[0], dtype=torch.int32, device=p.device).index_fill_(0, rows, 1)
                           for p, (_, rows) in zip(self.sparse, local)]) if local else None
        if flags is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        union, start = [], 0
        for p in self.sparse:
            union.append(flags[start : start + p.shape[0]].nonzero().squeeze(1))
            start += p.shape[0]
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.dense]
        pieces += [grad.index_select(0, rows).reshape(-1) for (grad, _), rows in zip(local, union)]
        n = sum(x.numel() for x in pieces)
        if n > self._flat.numel():
            self._flat = self._flat.new_empty(n + n // 4)
        flat = self._flat[:n]
        # Gradients are set to None at the start of every step, so nothing aliases the
        # buffer while it is refilled.
        torch.cat(pieces, out=flat)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.dense:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        for p, (grad, _), rows in zip(self.sparse, local, union):
            k = rows.numel() * (p.numel() // p.shape[0])
            grad.index_copy_(0, rows, flat[offset : offset + k].view(rows.numel(), *p.shape[1:]))
            self.embeddings.written(p, rows)
            p.grad = grad
            offset += k
