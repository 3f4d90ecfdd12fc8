"""Data-parallel gradient averaging for the Ray Train workers (:class:`GradientReducer`).

The model's encoders are methods (``encode_query`` / ``encode_documents``), not ``forward``,
so wrapping ``CIEAModel`` in ``DistributedDataParallel`` would sync nothing. We average
gradients ourselves: one all-reduce of the flattened gradients after the last micro-batch of
each optimiser step (token embeddings get sparse gradients and reduce only the rows some
rank touched). Why not a DDP wrapper whose ``forward`` calls ``compute_loss``: (1)
``compute_loss`` already makes identical collective calls on every rank (candidates
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

#: Embedding matrices with at least this many rows get sparse gradients (see
#: :class:`GradientReducer`); smaller ones (positions, token types) stay dense.
SPARSE_EMBEDDING_MIN_ROWS = 1024


class GradientReducer:
    """Averages gradients over data-parallel ranks, as DDP's reducer does, shaped by where
    a CPU step's time goes (the demo model, profiled per phase: BENCHMARKS.md).

    Token embeddings. A vocabulary matrix (all-MiniLM's 30k × 384 is two thirds of the
    demo model) is looked up about six times per step: queries, text documents, image
    captions (twice: the sequence and the extractor's caption side), image-only sequences
    and ``q_comp``. Dense, every lookup's backward fills a fresh 47 MB gradient and
    autograd adds them up: ~30 % of a worker's CPU time per step, none of it proportional
    to the batch, so data parallelism never amortises it. Here those modules run with
    ``sparse=True``: the backward keeps only the rows a batch touched. The union of the
    rows touched on any rank is agreed with one MAX all-reduce of per-row flags, only
    those rows travel in the gradient all-reduce, and the result is written into a
    persistent dense gradient whose other rows are zero (the rows of the previous step
    are cleared, not the whole matrix). The optimiser, clipping and weight decay see
    exactly the dense gradient they saw before.

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
        holders: dict[int, list[torch.nn.Module]] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                holders.setdefault(id(p), []).append(module)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # A weight tied to anything but embeddings (an LM head) gets dense gradients there.
        embeddings = {id(p): holders[id(p)] for p in trainable
                      if all(isinstance(m, torch.nn.Embedding) and m.num_embeddings >= min_rows for m in holders[id(p)])}
        for mods in embeddings.values():
            for module in mods:
                module.sparse = True
        self.sparse = [p for p in trainable if id(p) in embeddings]
        self.dense = [p for p in trainable if id(p) not in embeddings]
        self._grad = {id(p): torch.zeros_like(p) for p in self.sparse}  # persistent dense gradients
        self._rows: dict[int, torch.Tensor] = {}  # rows written into them last step
        dtype = trainable[0].dtype if trainable else torch.float32
        device = trainable[0].device if trainable else torch.device("cpu")
        if any(p.dtype != dtype for p in trainable):
            raise ValueError("GradientReducer needs one parameter dtype; cast the model (model.float()) first")
        # Dense gradients plus the touched embedding rows; grown when a step touches more.
        self._flat = torch.empty(0, dtype=dtype, device=device)

    def _local_embedding_grad(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's gradient of ``p`` in its persistent dense tensor; and its touched rows."""
        grad = self._grad[id(p)]
        if id(p) in self._rows:
            grad.index_fill_(0, self._rows[id(p)], 0)
        g = p.grad
        if g is None:
            rows = torch.zeros(0, dtype=torch.long, device=grad.device)
        elif g.is_sparse:
            g = g.coalesce()
            rows = g.indices()[0]
            grad.index_copy_(0, rows, g.values())
        else:  # a dense gradient after all (e.g. sparse switched off by the caller)
            grad.copy_(g)
            rows = g.reshape(g.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)
        self._rows[id(p)] = rows
        return grad, rows

    def reduce(self) -> None:
        """Replaces every ``.grad`` by its mean over ranks (dense tensors throughout)."""
        if any(p.grad is not None and p.grad.untyped_storage().data_ptr() == self._flat.untyped_storage().data_ptr()
               for p in self.dense[:1]) or any(p.grad is self._grad[id(p)] for p in self.sparse):
            raise RuntimeError("gradients still hold last step's reduced values: call "
                               "optimizer.zero_grad(set_to_none=True) before each step's backward")
        local = [self._local_embedding_grad(p) for p in self.sparse]
        if self.world == 1:
            for p, (grad, _) in zip(self.sparse, local):
                p.grad = grad
            return
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
            self._rows[id(p)] = rows
            p.grad = grad
            offset += k
