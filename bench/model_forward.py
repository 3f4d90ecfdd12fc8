"""Cost of the complementary information extractor (CIE): documents/s with and without it.

What is measured
    For each model size (``tiny``: a 64-wide toy; ``base``: the paper's shapes, T5-base
    text tower + CLIP ViT-B/32 vision tower + an 8-head / 2048-FFN extractor), two modes:

    * ``embed``: ``model.encode_documents(batch)`` under ``torch.inference_mode()``, the
      embedding-stage throughput of image documents (image + caption).
    * ``train``: one training step's forward + backward of
      :func:`ciea_model.training.compute_loss` (``L_c + λ·L_comp``) on a
      ``collate_training`` batch, one query per image document. The optimizer step is
      excluded by default (``--optimizer`` includes it, for both variants alike). This is
      the mode the paper's "+7 % training time" speaks to.

    Each mode is timed for two variants on the *same* model object and the *same*
    collated batch: ``CIE`` (the ``ciea`` variant as built) and ``no-CIE`` (the same model
    with ``model.extractor`` set to ``None`` for the duration of the call). With the
    extractor gone the model takes exactly the ``ciea-no-cie`` path (projected patches go
    straight into the LM; L_comp is kept), so the two variants share every weight and every
    input, and differ only in the extractor's work. This is cleaner than building a second
    model and copying the shared weights into it: there is one set of weights, one memory
    footprint, and nothing to keep in sync.

How
    Models are built at random (``create_model_and_processor(cfg, pretrained=False,
    seed=0)``) with a WordPiece tokenizer trained offline on synthetic captions and queries
    (:mod:`pipelines.ingest.sources.synthetic.generator`), so nothing is downloaded. The documents are synthetic image
    documents rendered at the vision tower's input size; collation happens once, before
    timing. After ``--warmup`` untimed calls of each variant, the variants are interleaved
    for ``--rounds`` rounds in ABBA order (the first variant alternates each round), which
    cancels slow drift and order effects on a shared machine; the per-variant median time is
    reported, documents/s = documents in the batch / median time, and ratio = median time
    with CIE / median time without. Two more columns guard against a busy machine: the
    ratio of the fastest rounds (noise only ever adds time, so minima estimate the
    uncontended cost even when most rounds were slowed) and the spread, slowest / fastest
    round. The 1-minute load average before and after the run is printed too: a load
    near or above the core count, or a spread well above ~1.3, means other processes
    competed for the cores (with torch's default threads every round can then be slowed
    alike, by tens of times at the tiny size, so a low spread alone proves nothing). The thread count is
    torch's default unless ``--threads`` is given, and is printed either way. On a shared CPU
    box ``--threads 1 --clock cpu`` (this process's CPU time, one thread so that no thread
    spins waiting for a descheduled peer) gives ratios that other processes barely move.

Caveats, both of which make the ratio slightly conservative (higher), not flattering: the
tokenizer's vocabulary is small (hundreds of tokens, not T5's 32k), so the LM's embedding
matrix and its gradient are smaller than in the real model; and synthetic captions are
short (about 20 tokens against WebQA's longer ones), so the LM, whose cost the extractor's
is compared with, sees shorter sequences than in the paper. Random weights do not change
the cost of a dense forward pass, with one exception: a key patch whose weight ``w`` falls
under the mask threshold is masked, which is rare at random init and costs the same anyway.

Run: ``python -m bench.model_forward`` (defaults: both sizes, CPU, fp32, about 3 minutes
on 2 idle CPU cores); ``--device cuda --dtype bf16`` on a GPU; ``--json out.json`` for the raw
numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers

from ciea_model import (
    CIEAConfig,
    CIEAModel,
    Document,
    DocumentBatch,
    ExtractorConfig,
    TextTowerConfig,
    TrainBatch,
    TrainExample,
    VisionTowerConfig,
    create_model_and_processor,
)
from ciea_model.processor import CIEAProcessor
from ciea_model.tokenizer import train_wordpiece_tokenizer
from ciea_model.training import OptimConfig, build_optimizer, compute_loss
from pipelines.ingest.sources.synthetic.generator import (
    SyntheticConfig,
    generate_queries,
    iter_documents,
)

logger = logging.getLogger("bench.model_forward")

MODES = ("embed", "train")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SizeSpec:
    """One model size: tower shapes, extractor shape and its benchmark defaults."""

    name: str
    text: dict[str, Any]
    vision: dict[str, Any]
    extractor: ExtractorConfig
    batch_size: int
    rounds: int
    warmup: int = 1


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        name="tiny",
        text={
            "model_type": "t5", "d_model": 64, "d_ff": 256, "num_layers": 2,
            "num_decoder_layers": 2, "num_heads": 4, "d_kv": 16,
        },
        vision={
            "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
        },
        extractor=ExtractorConfig(num_heads=8, ffn_dim=128),
        batch_size=32,
        rounds=20,
        warmup=3,
    ),
    # The paper's shapes: T5-base (OpenMatch/t5-ance), CLIP ViT-B/32 at 224 px (49
    # patches), extractor 8 heads / FFN 2048.
    "base": SizeSpec(
        name="base",
        text={
            "model_type": "t5", "d_model": 768, "d_ff": 3072, "num_layers": 12,
            "num_decoder_layers": 12, "num_heads": 12, "d_kv": 64,
        },
        vision={
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
        },
        extractor=ExtractorConfig(num_heads=8, ffn_dim=2048),
        batch_size=8,
        rounds=7,
        warmup=2,  # the first two calls at this size are several times slower (allocator)
    ),
}


@dataclass
class Result:
    """One (size, mode) measurement. Times are seconds per batch, one entry per round."""

    config: str
    mode: str
    batch: int
    rounds: int
    warmup: int
    times_no_cie: list[float] = field(default_factory=list)
    times_cie: list[float] = field(default_factory=list)

    @property
    def median_no_cie(self) -> float:
        return statistics.median(self.times_no_cie)

    @property
    def median_cie(self) -> float:
        return statistics.median(self.times_cie)

    @property
    def ratio(self) -> float:
        return self.median_cie / self.median_no_cie

    @property
    def ratio_min(self) -> float:
        """Ratio of the fastest rounds: noise on a shared machine only ever adds time, so
        the minima estimate the uncontended cost when fewer than half the rounds are clean."""
        return min(self.times_cie) / min(self.times_no_cie)

    @property
    def spread(self) -> float:
        """Slowest / fastest round of the noisier variant (1.0 = perfectly steady)."""
        return max(max(t) / min(t) for t in (self.times_no_cie, self.times_cie))

    @property
    def paired_ratios(self) -> list[float]:
        """Per-round CIE/no-CIE time; the two calls of a round run back to back."""
        return [c / n for c, n in zip(self.times_cie, self.times_no_cie, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            median_s_no_cie=self.median_no_cie, median_s_cie=self.median_cie,
            docs_per_s_no_cie=self.batch / self.median_no_cie,
            docs_per_s_cie=self.batch / self.median_cie, ratio=self.ratio,
            ratio_min=self.ratio_min, spread=self.spread,
            paired_ratio_median=statistics.median(self.paired_ratios),
            paired_ratio_min=min(self.paired_ratios), paired_ratio_max=max(self.paired_ratios),
        )
        return out


# ---- inputs ------------------------------------------------------------------------------
def _image_corpus(cfg: SyntheticConfig) -> Iterator[dict[str, Any]]:
    # Image documents only (global indices 0..num_image_docs-1): this benchmark times image
    # documents, and text documents are never rendered or needed.
    return iter_documents(cfg, 0, cfg.num_image_docs)


def train_tokenizer(out_dir: str) -> int:
    """Trains the shared offline WordPiece tokenizer on synthetic texts; returns its size."""
    cfg = SyntheticConfig(
        seed=0, num_image_docs=500, num_text_docs=100, num_queries=(300, 0, 0), image_size=16
    )
    texts = [d["caption"] for d in _image_corpus(cfg)]
    texts += [q["query"] for q in generate_queries(cfg)["train"]]
    tok = train_wordpiece_tokenizer(texts, out_dir, vocab_size=1000, style="t5")
    logger.info("tokenizer: %d tokens from %d texts", len(tok), len(texts))
    return len(tok)


def make_examples(batch_size: int, image_size: int) -> list[TrainExample]:
    """``batch_size`` training queries with distinct image-document positives.

    The positives (synthetic images rendered at ``image_size`` plus their captions) are
    the documents of both the ``embed`` and the ``train`` batches. Queries whose target is
    not an image document are skipped.
    """
    n_docs = max(64, 4 * batch_size)
    cfg = SyntheticConfig(
        seed=0, num_image_docs=n_docs, num_text_docs=max(1, n_docs // 4),
        num_queries=(8 * batch_size, 0, 0), image_size=image_size,
    )
    corpus = {
        d["doc_id"]: Document(d["doc_id"], "image", caption=d["caption"], image=d["image"])
        for d in _image_corpus(cfg)
    }
    examples: list[TrainExample] = []
    used: set[str] = set()
    for q in generate_queries(cfg)["train"]:
        target = q["target_doc_id"]
        if target in used or target not in corpus:
            continue
        used.add(target)
        captions = tuple(corpus[i].caption for i in q["positive_doc_ids"] if i in corpus)
        examples.append(TrainExample(
            qid=q["qid"], query=q["query"], positive=corpus[target],
            relevant_ids=frozenset(q["positive_doc_ids"]), positive_captions=captions,
        ))
        if len(examples) == batch_size:
            return examples
    raise RuntimeError(
        f"found only {len(examples)} queries with distinct image targets for --batch-size "
        f"{batch_size}; lower it"
    )


def build_config(spec: SizeSpec, tokenizer_dir: str, vocab_size: int) -> CIEAConfig:
    text = dict(spec.text, vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return CIEAConfig(
        variant="ciea",
        text=TextTowerConfig(hf_config=text, tokenizer=tokenizer_dir),
        vision=VisionTowerConfig(hf_config=dict(spec.vision)),
        extractor=spec.extractor,
    )


# ---- timing ------------------------------------------------------------------------------
@contextlib.contextmanager
def extractor_off(model: CIEAModel) -> Iterator[None]:
    """Runs the model without its extractor (the ``ciea-no-cie`` path), then restores it."""
    saved = model.extractor
    model.extractor = None
    try:
        yield
    finally:
        model.extractor = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def embed_step(
    model: CIEAModel, batch: DocumentBatch, device: torch.device, dtype: torch.dtype | None
) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            model.encode_documents(batch)
        _sync(device)

    return step


def train_step_fn(
    model: CIEAModel, batch: TrainBatch, device: torch.device, dtype: torch.dtype | None,
    optimizer: torch.optim.Optimizer | None,
) -> Callable[[], None]:
    def step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = compute_loss(model, batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        _sync(device)

    return step


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleave(
    model: CIEAModel, step: Callable[[], None], warmup: int, rounds: int, clock: str = "wall"
) -> tuple[list[float], list[float]]:
    """Times ``step`` without and with the extractor, ABBA-interleaved; returns the
    per-round seconds (no-CIE, CIE) on ``clock`` (see :data:`CLOCKS`)."""
    now = CLOCKS[clock]

    def no_cie() -> None:
        with extractor_off(model):
            step()

    for _ in range(warmup):
        no_cie()
        step()
    times: dict[str, list[float]] = {"no_cie": [], "cie": []}
    variants = [("no_cie", no_cie), ("cie", step)]
    for r in range(rounds):
        for name, fn in variants if r % 2 == 0 else variants[::-1]:
            t0 = now()
            fn()
            times[name].append(now() - t0)
        logger.debug("round %d: no-CIE %.4fs, CIE %.4fs", r, times["no_cie"][-1], times["cie"][-1])
    return times["no_cie"], times["cie"]


def bench_size(
    spec: SizeSpec, tokenizer_dir: str, vocab_size: int, args: argparse.Namespace,
    device: torch.device, dtype: torch.dtype | None,
) -> list[Result]:
    batch_size = args.batch_size or spec.batch_size
    rounds = args.rounds or spec.rounds
    warmup = spec.warmup if args.warmup is None else args.warmup
    cfg = build_config(spec, tokenizer_dir, vocab_size)
    t0 = time.perf_counter()
    model, processor = create_model_and_processor(cfg, pretrained=False, seed=0)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_cie = sum(p.numel() for p in model.extractor.parameters())
    logger.info(
        "%s: built in %.1fs, %.1fM parameters, extractor %.2fM (%.1f%%)",
        spec.name, time.perf_counter() - t0, n_params / 1e6, n_cie / 1e6, 100 * n_cie / n_params,
    )
    examples = make_examples(batch_size, processor.image_transform.size)
    results = []
    for mode in args.modes:
        step, n_docs = _make_step(mode, model, processor, examples, device, dtype, args.optimizer)
        logger.info("%s/%s: batch %d, warm-up %d, %d rounds", spec.name, mode, n_docs, warmup, rounds)
        t_no, t_cie = interleave(model, step, warmup, rounds, args.clock)
        res = Result(spec.name, mode, n_docs, rounds, warmup, t_no, t_cie)
        logger.info(
            "%s/%s: median %.4fs no-CIE, %.4fs CIE, ratio %.3f (of minima %.3f, spread %.2f)",
            spec.name, mode, res.median_no_cie, res.median_cie, res.ratio, res.ratio_min,
            res.spread,
        )
        results.append(res)
    del model
    return results


def _make_step(
    mode: str, model: CIEAModel, processor: CIEAProcessor, examples: Sequence[TrainExample],
    device: torch.device, dtype: torch.dtype | None, with_optimizer: bool,
) -> tuple[Callable[[], None], int]:
    """Collates the batch for ``mode`` once and returns (timed step, documents per step)."""
    if mode == "embed":
        docs = processor.collate_documents([ex.positive for ex in examples]).to(device)
        return embed_step(model, docs, device, dtype), docs.size
    batch = processor.collate_training(examples).to(device)
    if batch.comp_queries is None:
        logger.warning("train batch has no L_comp queries: the step measures L_c only")
    optimizer = build_optimizer(model, OptimConfig()) if with_optimizer else None
    return train_step_fn(model, batch, device, dtype, optimizer), batch.documents.size


# ---- output ------------------------------------------------------------------------------
def machine_info(device: torch.device, dtype_name: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "dtype": dtype_name,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _fmt_load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| config | mode | batch | docs/s no-CIE | docs/s CIE | ratio (median time) "
        "| ratio (min time) | spread (max/min) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.mode} | {r.batch} | {r.batch / r.median_no_cie:.2f} | "
            f"{r.batch / r.median_cie:.2f} | {r.ratio:.3f}× | {r.ratio_min:.3f}× | "
            f"{r.spread:.2f} |"
        )
    return "\n".join(lines)


def _csv(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{what} must be a comma list of {list(allowed)}; got {value!r}")
        return items

    return parse


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.model_forward",
        description="Documents/s of encode_documents and of a training step, with and without "
        "CIEA's complementary information extractor, and the extractor's cost ratio.",
    )
    p.add_argument("--configs", type=_csv(tuple(SIZES), "--configs"), default=["tiny", "base"],
                   help="comma list of model sizes to run (default: tiny,base)")
    p.add_argument("--modes", type=_csv(MODES, "--modes"), default=list(MODES),
                   help="comma list of modes: embed (inference encode_documents) and/or train "
                   "(forward+backward of compute_loss) (default: embed,train)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="image documents per batch (= training queries per step); default "
                   + ", ".join(f"{s.name} {s.batch_size}" for s in SIZES.values()))
    p.add_argument("--rounds", type=_positive, default=None,
                   help="timed interleaved rounds per mode (each runs both variants); default "
                   + ", ".join(f"{s.name} {s.rounds}" for s in SIZES.values()))
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls of each variant before timing; default "
                   + ", ".join(f"{s.name} {s.warmup}" for s in SIZES.values()))
    p.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu (default) or cuda / cuda:0")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="fp32 (default) or bf16 (torch.autocast; meant for --device cuda)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch.set_num_threads(N) before timing (default: leave torch's default, "
                   "which is printed); 1 makes CPU timings less sensitive to other processes")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall (default): elapsed time, what throughput means; cpu: this "
                   "process's CPU time (CPU device only), which other processes on a shared "
                   "machine barely disturb; pair it with --threads 1, since idle threads spinning "
                   "at barriers count as CPU time")
    p.add_argument("--optimizer", action="store_true",
                   help="include an AdamW step (the release's settings) in the train mode, for "
                   "both variants (default: forward+backward only)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write machine info, settings and per-round times as JSON here")
    p.add_argument("--verbose", "-v", action="store_true", help="log every round's times")
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        p.error("--clock cpu measures host CPU time: use it with --device cpu only")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("transformers", "ciea_model"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.error("--device %s asked for, but CUDA is not available", args.device)
        return 2
    dtype = DTYPES[args.dtype]
    info = machine_info(device, args.dtype)
    logger.info("machine: %s", info)
    load_start = _load()
    if load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        logger.warning(
            "1-min load average is %.2f on %s CPUs before the run: other processes compete for "
            "the cores and the times will be noisy (see the spread column; --threads 1 "
            "--clock cpu is steadier)",
            load_start, os.cpu_count(),
        )
    t_start = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="ciea-bench-tok-") as tok_dir:
        vocab = train_tokenizer(tok_dir)
        for name in args.configs:
            results.extend(bench_size(SIZES[name], tok_dir, vocab, args, device, dtype))
    wall = time.perf_counter() - t_start
    info["load_avg_1min"] = {"start": load_start, "end": _load()}

    print(
        f"CIE cost ({args.clock} clock), {info['device']}{' (' + info['gpu'] + ')' if 'gpu' in info else ''} {args.dtype}; "
        f"torch {info['torch']}, {info['torch_threads']} thread(s), {info['cpu_count']} CPUs; "
        f"train = forward+backward of L_c + λ·L_comp{' + AdamW step' if args.optimizer else ''}; "
        f"median of ABBA-interleaved rounds; 1-min load average {_fmt_load(load_start)} at "
        f"start, {_fmt_load(info['load_avg_1min']['end'])} at end"
    )
    print()
    print(markdown_table(results))
    print()
    print(f"total {wall:.0f}s")
    if args.json:
        payload = {
            "machine": info, "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "wall_s": wall, "results": [r.to_dict() for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
