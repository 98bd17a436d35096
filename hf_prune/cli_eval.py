"""``hf-prune eval``: a model on one of hf-prune's evaluation tasks, or on lm-evaluation-harness tasks, alone
or against the original (``--compare``). Kept apart from ``cli.py``, which registers it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import HfPruneError
from .recipe import EVAL_CORRUPTIONS, EVAL_TASKS

EVAL_EXAMPLES = """examples:
  hf-prune eval out/stories-4layers --task perplexity --data eval.txt --seq-len 512 --output results.json
  hf-prune eval out/stories-4layers --task multiple_choice --data cloze.jsonl --compare models/stories260K
  hf-prune eval out/minilm-pruned --task classification --data sentences.jsonl --label-field label
  hf-prune eval out/llava-pruned --task vqa --data vqa.jsonl --device auto --dtype bfloat16
  hf-prune eval out/vit-sparse --task corruption_robustness --data ../shared/assets/images/fashion-mnist \\
      --limit 1000 --severities 1 3 5 --plot robustness.png --output robustness.json
  hf-prune eval out/llama-tokens --harness lm-eval --tasks hellaswag,arc_easy --compare meta-llama/Llama-3.2-1B
  hf-prune eval out/llama-tokens --harness lm-eval --tasks my_task --include-path my_tasks/ --output results.json

--compare also evaluates ORIGINAL, benchmarks both, and writes report.md with plots to --report-dir.
corruption_robustness scores an image classifier on the clean test images and under CIFAR-10-C corruptions
(all ten at severities 1-5 unless --corruptions / --severities say); --plot draws accuracy per corruption.
--harness lm-eval runs lm-evaluation-harness with its hf-prune model (as `lm_eval --model hf-prune`):
a prompt-pruned model is scored with its context pruned at prefill, any other as `--model hf` scores it."""


def add_eval_arguments(sub: argparse.ArgumentParser) -> None:
    from .cli import positive_int

    sub.add_argument("model", help="model folder or hub id")
    sub.add_argument(
        "--task", choices=list(EVAL_TASKS), help="evaluation task (hf-prune's own harness; needs --data)"
    )
    sub.add_argument(
        "--data",
        help="local .txt/.jsonl/.json/.parquet file (or a datasets hub id); corruption_robustness: an image "
        "folder of class sub-folders or an IDX folder",
    )
    sub.add_argument(
        "--harness",
        choices=["hf-prune", "lm-eval"],
        default="hf-prune",
        help="hf-prune: --task on --data (default); lm-eval: lm-evaluation-harness --tasks through its "
        "hf-prune model (pip install 'hf-prune[lm-eval]')",
    )
    sub.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval task names (with --harness lm-eval)"
    )
    sub.add_argument(
        "--include-path",
        default=None,
        help="a folder of your own lm-eval task YAML files (--harness lm-eval)",
    )
    sub.add_argument(
        "--compare",
        metavar="ORIGINAL",
        default=None,
        help="also evaluate and benchmark ORIGINAL, report the retained fraction, write a report",
    )
    sub.add_argument("--report-dir", default="eval-report", help="where --compare writes report.md and plots")
    sub.add_argument(
        "--seq-len", type=positive_int, default=None, help="perplexity window (default: model max, <= 1024)"
    )
    sub.add_argument(
        "--context-len",
        type=positive_int,
        default=None,
        help="perplexity: score only the tokens after each window's first N (the context; a prompt-pruned "
        "model prunes it at prefill, and gets seq_len // 2 by default)",
    )
    sub.add_argument(
        "--batch-size", type=positive_int, default=8, help="examples per forward pass (default 8)"
    )
    sub.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate at most this many examples / windows"
    )
    sub.add_argument("--text-field", default="text", help="text column (perplexity, classification)")
    sub.add_argument("--text-pair-field", default=None, help="second text column (classification pairs)")
    sub.add_argument("--label-field", default="label", help="label column (classification)")
    sub.add_argument("--max-new-tokens", type=positive_int, default=8, help="answer length limit (vqa)")
    sub.add_argument(
        "--corruptions",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"corruption_robustness: corruptions to apply (default all: {', '.join(EVAL_CORRUPTIONS)})",
    )
    sub.add_argument(
        "--severities",
        nargs="+",
        type=int,
        metavar="N",
        default=None,
        help="corruption_robustness: severities 1..5 to apply (default all five)",
    )
    sub.add_argument(
        "--seed",
        type=int,
        default=0,
        help="corruption_robustness: seed of the random corruptions (default 0)",
    )
    sub.add_argument(
        "--plot",
        metavar="PNG",
        default=None,
        help="corruption_robustness: write accuracy per corruption and severity to this PNG (with --compare, "
        "both models; the report folder gets one too)",
    )


def run_eval(args: argparse.Namespace) -> int:
    from .checkpoint import check_device
    from .cli import print_and_write
    from .evals.report import format_retained
    from .evals.run_checkpoints import compare_checkpoints, evaluate_checkpoint
    from .recipe import EvaluationTask, build_dataclass

    check_device(args.device, key="--device")
    if args.harness == "lm-eval":
        return _eval_lm_eval(args)
    for flag, value in (("--tasks", args.tasks), ("--include-path", args.include_path)):
        if value is not None:
            raise HfPruneError(
                f"{flag} is for --harness lm-eval; hf-prune's own harness takes --task and --data"
            )
    for flag, value in (("--task", args.task), ("--data", args.data)):
        if value is None:
            raise HfPruneError(f"{flag} is required (or --harness lm-eval --tasks T1,T2)")
    if args.plot is not None and args.task != "corruption_robustness":
        raise HfPruneError(f"--plot draws corruption_robustness results; task {args.task!r} has no plot")
    task = build_dataclass(
        EvaluationTask,
        {
            "task": args.task,
            "data": args.data,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "limit": args.limit,
            "text_field": args.text_field,
            "text_pair_field": args.text_pair_field,
            "label_field": args.label_field,
            "max_new_tokens": args.max_new_tokens,
            "context_len": args.context_len,
            "corruptions": args.corruptions,
            "severities": args.severities,
            "seed": args.seed,
        },
        "eval",
    )
    placement = {
        "device": args.device,
        "device_map": args.device_map,
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        "allow_pickle": args.allow_pickle,
    }
    if args.compare:
        results = compare_checkpoints(
            args.model,
            args.compare,
            task,
            report_dir=Path(args.report_dir),
            progress=not args.quiet,
            **placement,
        )
    else:
        results = evaluate_checkpoint(args.model, task, progress=not args.quiet, **placement)
    print_and_write(results, args.output)
    if args.plot:
        _plot_robustness(results, args.plot, compared=bool(args.compare))
    if args.compare:
        print(
            f"retained {format_retained(results['retained'])}; report: {results['report']}", file=sys.stderr
        )
    return 0


def _plot_robustness(results: dict[str, Any], path: str, *, compared: bool) -> None:
    from .evals.image_robustness import plot_corruption_robustness

    if compared:
        runs = [
            (f"{Path(results['original_model']).name} (original)", results["original"]),
            (f"{Path(results['model']).name} (pruned)", results["pruned"]),
        ]
    else:
        runs = [(Path(results["model"]).name, results)]
    print(f"plot: {plot_corruption_robustness(runs, path)}", file=sys.stderr)


def _eval_lm_eval(args: argparse.Namespace) -> int:
    from .cli import print_and_write
    from .evals.lm_eval_harness import compare_with_lm_eval, evaluate_with_lm_eval
    from .evals.report import format_retained

    if args.task is not None or args.data is not None:
        raise HfPruneError("--harness lm-eval takes --tasks (lm-eval task names), not --task / --data")
    if args.allow_pickle or args.device_map:
        flag = "--allow-pickle" if args.allow_pickle else "--device-map"
        raise HfPruneError(f"{flag} is not available with --harness lm-eval (lm-eval loads the model itself)")
    tasks = [task.strip() for task in (args.tasks or "").split(",") if task.strip()]
    placement = {
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "trust_remote_code": args.trust_remote_code,
    }
    options = {"include_path": args.include_path, "limit": args.limit, "placement": placement}
    if args.compare:
        results = compare_with_lm_eval(
            args.model,
            args.compare,
            tasks,
            report_dir=Path(args.report_dir),
            progress=not args.quiet,
            **options,
        )
    else:
        results = evaluate_with_lm_eval(args.model, tasks, **options)
    print_and_write(results, args.output)
    for entry in results.get("evaluation", []):
        print(f"{entry['task']}: retained {format_retained(entry['retained'])}", file=sys.stderr)
    if args.compare:
        print(f"report: {results['report']}", file=sys.stderr)
    return 0
