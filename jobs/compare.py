"""``ciea compare``: generate the synthetic corpus, train CIEA and its baselines in-process on
CPU, evaluate on the test split and print one table split by query kind — the research
loop for ablations and seeds (``ciea demo`` runs the production pipeline on Ray instead).

The corpus's images carry attributes their captions omit; ``image`` queries ask about
them, so a caption-only retriever cannot answer them and CIEA should. Every run writes
the resolved config, per-variant results and (for CIEA) a checkpoint under
``output_dir``.

Examples::

    ciea compare                                # CIEA + 3 baselines, 1 seed (the README table)
    ciea compare --preset tiny                     # seconds; what the tests run
    ciea compare --variants ciea,marvel,ciea-no-cie,ciea-no-comp --seeds 1234,1235,1236
    ciea compare --config demo.yaml --set train.epochs=5
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

from ciea_model import VARIANTS
from pipelines.train import compare as C
from pipelines.train.compare import (
    CompareConfig,
    CompareResult,
    CompareSetupError,
    CorpusSettings,
    Variant,
    VisionPretrainSettings,
    check_vision_seed,
    distinct_variants,
)

from .common import job_logging, job_overrides, job_parser, parse_job_config

__all__ = ["PRESETS", "CompareConfig", "CorpusSettings", "DemoConfig", "Variant", "VisionPretrainSettings",
           "check_vision_seed", "distinct_variants", "execute", "main", "parse_config", "pretrained_vision_path",
           "synthetic_corpus"]

logger = logging.getLogger("ciea.compare")

#: The config's former name (``ciea demo`` builds one to pretrain its vision tower).
DemoConfig = CompareConfig

PRESETS: dict[str, dict] = {
    "demo": {},
    "tiny": {
        "preset": "tiny",
        "corpus": {"num_image_docs": 120, "num_text_docs": 40, "num_queries": (96, 24, 40)},
        "train": {"warmup_epochs": 1, "epochs": 1, "stage2_epochs": 1, "batch_size": 16, "eval_every": 6, "patience": 2,
                  "lr": 1e-3, "new_lr": 1e-3},
        "vision_pretrain": {"pairs": 256, "heldout": 64, "epochs": 1, "batch_size": 64},
        "output_dir": "runs/compare-tiny",
    },
}


PROG = "ciea compare"
FLAGS = {"output_dir": "output_dir"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, CompareConfig, presets=PRESETS, default_preset="demo", progress=None,
                   set_example="train.epochs=5")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--seeds", help="comma-separated training seeds, e.g. 1234,1235,1236")
    p.add_argument("--output-dir", help="output directory (default runs/compare)")
    return p


def parse_config(argv: list[str] | None) -> tuple[CompareConfig, argparse.Namespace]:
    """The command line → the validated config (nothing run yet); exits with the errors."""
    args = _parser().parse_args(argv)
    extra = ([f"variants=[{args.variants}]"] if args.variants else []) + \
        ([f"seeds=[{args.seeds}]"] if args.seeds else [])
    return parse_job_config(PROG, CompareConfig, args, job_overrides(args, FLAGS, extra=extra), presets=PRESETS), args


def synthetic_corpus() -> C.CorpusMaker:
    """The embedded default corpus (``pipelines.ingest.sources.synthetic.generator``) as the
    in-process loop takes it: the job wires the two phases, which never import each other."""
    from pipelines.ingest.sources.synthetic.generator import (
        SyntheticConfig,
        attach_query_images,
        generate_queries,
        iter_documents,
        iter_image_text_pairs,
    )

    def config(c: CorpusSettings) -> SyntheticConfig:
        return SyntheticConfig(
            seed=c.seed, num_image_docs=c.num_image_docs, num_text_docs=c.num_text_docs, num_queries=c.num_queries,
            image_size=c.image_size, complementary_fraction=c.complementary_fraction,
            text_query_fraction=c.text_query_fraction, num_collections=c.num_collections,
            p_caption_states=c.p_caption_states, num_composed=tuple(c.num_composed))

    def queries(c: CorpusSettings) -> dict[str, list[dict]]:
        # Composed queries carry their reference picture, as ingest stores it with the query.
        return attach_query_images(config(c), generate_queries(config(c)))

    return C.CorpusMaker(documents=lambda c: iter_documents(config(c)), queries=queries,
                         image_text_pairs=iter_image_text_pairs)


def pretrained_vision_path(cfg: CompareConfig, tokenizer_dir: Path, out: Path, progress: bool = True) -> Path | None:
    """:func:`pipelines.train.compare.pretrained_vision_path` on the synthetic corpus, its
    refusal as an exit message."""
    try:
        return C.pretrained_vision_path(cfg, synthetic_corpus(), tokenizer_dir, out, progress=progress)
    except CompareSetupError as e:
        raise SystemExit(str(e)) from None


def print_results(cfg: CompareConfig, result: CompareResult) -> None:
    runs = result.reports
    print(f"\nTest split ({result.num_test} queries; 'caption' queries are answerable from "
          f"the caption, 'image' queries need what only the image shows, 'text' queries are "
          f"answered by text documents), ×100"
          + (f", mean ± std over {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else "") + ":\n")
    print(result.table)
    if "ciea" in runs and "text-only" in runs:
        gap = statistics.fmean(100 * r.value("MRR@10", "image") for r in runs["ciea"]) - statistics.fmean(
            100 * r.value("MRR@10", "image") for r in runs["text-only"])
        print(f"\nCIEA − text-only on image queries: {gap:+.2f} MRR@10 points")


def execute(cfg: CompareConfig) -> int:
    """Trains and scores every variant and seed on a parsed config (:func:`pipelines.train.compare.run`:
    results.json, the checkpoint) and prints the table. Returns the exit code (1: a metric
    came out NaN)."""
    try:
        result = C.run(cfg, synthetic_corpus())
    except CompareSetupError as e:
        raise SystemExit(str(e)) from None
    print_results(cfg, result)
    print(f"\nresults: {Path(cfg.output_dir) / 'results.json'}   ({result.seconds / 60:.1f} min)")
    return 0 if result.finite else 1


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
