"""The ``hf-prune`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .cli_eval import EVAL_EXAMPLES, add_eval_arguments, run_eval
from .cli_graphon import EXAMPLES as GRAPHON_EXAMPLES
from .cli_graphon import add_graphon_arguments, run_graphon
from .errors import HfPruneError

_EXAMPLES = {
    "prune": """example:
  hf-prune prune recipe.yaml

recipe.yaml:
  model: ../shared/assets/models/stories260K
  output: out/stories-4layers
  calibration: {data: data/calib.txt, num_samples: 64, seq_len: 256}
  stages:
    - {method: replaceme, num_layers: 1, estimator: lstsq}
  evaluate:
    - {task: perplexity, data: data/eval.txt}""",
    "train": """example:
  hf-prune train sparse.yaml

sparse.yaml:
  model: ../shared/assets/models/stories260K
  output: out/stories-sparse80
  train:
    data: ../shared/assets/text/tinystories/sample.txt
    max_length: 64
    arguments: {max_steps: 200, learning_rate: 1.0e-3, per_device_train_batch_size: 8}
  stages:
    - {method: gmp, final_sparsity: 0.8, end_step: 150, frequency: 10, targets: ["*mlp*", "*self_attn*"]}
  evaluate:
    - {task: perplexity, data: data/eval.txt}

Methods: gmp, granet (hf-prune methods NAME lists the keys), lottery (rounds of training).
train.arguments takes any transformers.TrainingArguments field; Trainer checkpoints go to
OUTPUT.checkpoints unless output_dir says otherwise.""",
    "eval": EVAL_EXAMPLES,
    "bench": """examples:
  hf-prune bench out/stories-4layers --vs ../shared/assets/models/stories260K
  hf-prune bench out/stories-4layers --seq-lens 128 256 512 --decode-tokens 32 --output bench.json""",
    "inspect": """example:
  hf-prune inspect ../shared/assets/models/stories260K""",
    "methods": """example:
  hf-prune methods            # every method with its config fields
  hf-prune methods replaceme  # one method""",
    "push": """examples:
  hf-prune push out/stories-4layers --repo-id me/stories-4layers --dry-run   # list what would be sent
  hf-prune push out/stories-4layers --repo-id me/stories-4layers --base-model org/stories260K
  HF_ENDPOINT=https://hub.example.org hf-prune push out/x --repo-id team/x --private --revision pruned

Sends the folder in one commit: weights, config, tokenizer / processor, remote code when present,
hf_prune.json and README.md (both rendered for the Hub: no local path; the local folder is not changed).
The token is read by huggingface_hub: HF_TOKEN, else the login cache (`hf auth login`); it is never
printed. The address is --endpoint, else HF_ENDPOINT, else https://huggingface.co.
In a recipe, a publish: section pushes after the save (publish: {repo_id: me/x, private: true}).""",
    "graphon": GRAPHON_EXAMPLES,
    "demo": """example:
  hf-prune demo                       # trains the embedded model on first use (~1-2 min), then prunes it
  hf-prune demo --output out/demo""",
}


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-prune",
        description="Config-driven pruning of Hugging Face Transformers models.",
        epilog="examples:\n  hf-prune prune recipe.yaml\n  hf-prune train sparse.yaml\n"
        "  hf-prune eval MODEL --task perplexity --data FILE\n"
        "  hf-prune inspect MODEL\n  hf-prune methods\n  hf-prune push OUTPUT --repo-id ORG/NAME\n"
        "  hf-prune graphon --method random snip synflow --widths 128 512 --sparsity 0.8 --output DIR\n"
        "  hf-prune demo\n\n"
        "Run 'hf-prune COMMAND --help' for the options and an example of each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-prune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.add_argument("--debug", action="store_true", help="print the full traceback of an error")
        sub.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow a model folder's own modeling code (auto_map) to run; off by default, "
            "and no command ever asks",
        )
        return sub

    prune = command("prune", "Run a pruning recipe (YAML or JSON) and save the pruned model.")
    prune.add_argument("recipe", help="recipe file (.yaml, .yml or .json)")
    prune.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder that is not an earlier hf-prune output (never the "
        "working folder, a home folder, an ancestor of either, or a folder holding the recipe "
        "or its data)",
    )

    train = command(
        "train", "Fine-tune with transformers.Trainer while a training-time method prunes, then save."
    )
    train.add_argument("recipe", help="recipe file (.yaml, .yml or .json) with a train section")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder (as prune --overwrite)"
    )

    def placement_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--device", default="auto", help="auto (cuda if present, else cpu) | cpu | cuda | cuda:N"
        )
        sub.add_argument(
            "--device-map",
            default=None,
            help="accelerate device map, e.g. auto: spread a model larger than one GPU",
        )
        sub.add_argument(
            "--dtype",
            default=None,
            choices=["auto", "float32", "bfloat16", "float16"],
            help="weights dtype (default: bfloat16 on CUDA, the checkpoint's dtype on CPU)",
        )
        sub.add_argument(
            "--allow-pickle",
            action="store_true",
            help="allow non-safetensors (pickle) weights, which can run code when loaded",
        )
        sub.add_argument("--output", default=None, help="also write the results to this JSON file")

    evaluate = command(
        "eval",
        "Evaluate a model on a task through evaluate metric modules, or on lm-evaluation-harness tasks.",
    )
    add_eval_arguments(evaluate)
    placement_options(evaluate)

    bench = command("bench", "Benchmark prefill latency, decode speed, memory, parameters, size and FLOPs.")
    bench.add_argument("model", help="model folder or hub id")
    bench.add_argument(
        "--vs", metavar="ORIGINAL", default=None, help="benchmark ORIGINAL too and report ratios"
    )
    bench.add_argument(
        "--seq-lens", type=positive_int, nargs="+", default=[128, 512, 1024], help="prefill lengths"
    )
    bench.add_argument("--batch-size", type=positive_int, default=1, help="sequences per prefill")
    bench.add_argument(
        "--decode-tokens", type=positive_int, default=64, help="tokens generated for decode speed"
    )
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (medians reported)")
    bench.add_argument("--warmup", type=non_negative_int, default=1, help="untimed warm-up runs")
    placement_options(bench)

    inspect = command(
        "inspect", "Show the architecture facts hf-prune knows about a model and which methods apply."
    )
    inspect.add_argument("model", help="model folder or hub id")

    methods = command("methods", "List registered pruning methods and their config fields.")
    methods.add_argument("name", nargs="?", help="show only this method")

    push = command("push", "Publish a saved output folder to the Hub in one commit.")
    push.add_argument("output", help="an output folder saved by hf-prune prune / train")
    push.add_argument("--repo-id", required=True, help="the Hub repo, ORG/NAME (created when missing)")
    push.add_argument(
        "--endpoint", default=None, help="Hub address (default: HF_ENDPOINT, else huggingface.co)"
    )
    push.add_argument(
        "--private", action="store_true", help="create the repo private (an existing one is kept)"
    )
    push.add_argument(
        "--revision", default=None, help="branch to commit to (created when missing; default main)"
    )
    push.add_argument(
        "--commit-message", default=None, help="the commit's message (default names the methods)"
    )
    push.add_argument(
        "--base-model", default=None, help="Hub id of the model it was pruned from (the card's base_model)"
    )
    push.add_argument("--dry-run", action="store_true", help="list what would be sent; contact nothing")

    graphon = command(
        "graphon",
        "Graphons of pruning masks: a study of pruning-at-initialisation scorers, or a checkpoint's.",
    )
    add_graphon_arguments(graphon)

    demo = command("demo", "Prune the embedded demo model with ReplaceMe and layer_drop, evaluate, reload.")
    demo.add_argument("--output", default="out/demo", help="folder for the demo outputs (default out/demo)")
    return parser


#: Exit codes: bad input (a one-line message naming what is wrong), an internal error, Ctrl-C.
EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet or args.command == "demo":
        _silence_library_progress()
    commands = {
        "prune": _prune,
        "train": _train,
        "eval": run_eval,
        "bench": _bench,
        "inspect": _inspect,
        "methods": _methods,
        "push": _push,
        "graphon": run_graphon,
        "demo": _demo,
    }
    try:
        return commands[args.command](args)
    except Exception as exc:  # the one error handler of every command
        return _report_error(exc, debug=args.debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _report_error(exc: Exception, *, debug: bool) -> int:
    """One line on stderr; the traceback only with ``--debug``. Bad input exits 2, anything else 1."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    bad_input = isinstance(exc, (HfPruneError, FileNotFoundError))
    message = " ".join(str(exc).split()) or type(exc).__name__
    if len(message) > 2000:  # a message quoting a huge value stays readable
        message = message[:2000] + " ..."
    if bad_input:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    hint = "" if debug else " (rerun with --debug for the traceback)"
    print(f"internal error: {type(exc).__name__}: {message}{hint}", file=sys.stderr)
    return EXIT_INTERNAL


def _silence_library_progress() -> None:
    """Hide transformers' and datasets' own bars and info logs (weight loading, shard writing)."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _prune(args: argparse.Namespace) -> int:
    from .engine.distributed import is_main_process
    from .evals.report import format_retained
    from .pipeline import prune

    result = prune(
        args.recipe,
        progress=not args.quiet,
        overwrite=args.overwrite or None,
        trust_remote_code=args.trust_remote_code or None,
    )
    if result.output is None and not is_main_process():  # data-parallel: rank 0 reports and saves
        return 0
    report = result.report
    engine = report.get("engine", {})
    if engine.get("name") == "sequential" or engine.get("processes", 1) > 1:
        print(f"engine: {engine['name']} ({engine['why']}), {engine['processes']} process(es)")
    print(
        f"parameters: {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.1%})"
    )
    for stage in report["stages"]:
        removed = stage.get("removed_layers")
        detail = f" removed layers {removed}" if removed is not None else ""
        if "perplexity_after" in stage:  # heal
            detail = f" perplexity {stage['perplexity_before']:.4g} -> {stage['perplexity_after']:.4g}"
        print(f"stage {stage['method']}:{detail} in {stage['seconds']:.2f}s")
    for entry in report["evaluation"]:
        metric = entry["metric"]
        print(
            f"{entry['task']} ({metric}) on {entry['data']}: original {entry['original'][metric]:.4g}, "
            f"pruned {entry['pruned'][metric]:.4g}, retained {format_retained(entry['retained'])}"
        )
    print(f"saved to {result.output}")
    _print_published(result.published)
    return 0


def _print_published(published: Any) -> None:
    if published is not None:
        print(f"pushed {len(published.files)} files to {published.repo_url} ({published.revision})")
        print(f"commit: {published.commit_url}")


def _push(args: argparse.Namespace) -> int:
    from .integrations.hub import check_repo_ids, describe_plan, plan_upload, push_folder

    if args.dry_run:
        check_repo_ids(args.repo_id, args.base_model)
        files = plan_upload(args.output, args.repo_id, base_model=args.base_model)
        print(f"would push to {args.repo_id} ({args.revision or 'main'}), contacting nothing:")
        print("\n".join(describe_plan(files)))
        return 0
    result = push_folder(
        args.output,
        args.repo_id,
        endpoint=args.endpoint,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        base_model=args.base_model,
        progress=not args.quiet,
    )
    _print_published(result)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .evals.report import format_retained
    from .train_pipeline import train

    result = train(
        args.recipe,
        progress=not args.quiet,
        overwrite=args.overwrite or None,
        trust_remote_code=args.trust_remote_code or None,
    )
    stage = result.report["stages"][0]
    print(
        f"stage {stage['method']}: sparsity {stage['sparsity']:.1%} of the targeted weights "
        f"({stage['pruned_weights']:,} of {stage['targeted_weights']:,}) in {stage['seconds']:.1f}s"
    )
    for entry in result.report["evaluation"]:
        metric = entry["metric"]
        print(
            f"{entry['task']} ({metric}) on {entry['data']}: original {entry['original'][metric]:.4g}, "
            f"trained and pruned {entry['pruned'][metric]:.4g}, retained {format_retained(entry['retained'])}"
        )
    print(f"saved to {result.output}")
    _print_published(result.published)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .checkpoint import check_device
    from .evals.run_checkpoints import bench_checkpoints

    check_device(args.device, key="--device")
    results, table = bench_checkpoints(
        args.model,
        args.vs,
        seq_lens=tuple(args.seq_lens),
        batch_size=args.batch_size,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        device_map=args.device_map,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    print(table)
    if args.output:
        _write_json(results, args.output)
    return 0


def print_and_write(results: dict[str, Any], output: str | None) -> None:
    """The results as JSON on stdout, and into ``output`` when given."""
    print(json.dumps(results, indent=2, default=str))
    if output:
        _write_json(results, output)


def _write_json(results: dict[str, Any], output: str) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(results, indent=2, default=str) + "\n")


def _inspect(args: argparse.Namespace) -> int:
    import torch

    from .adapters import auto_model_class, count_parameters, get_adapter
    from .checkpoint import load_config
    from .registry import registered_methods

    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    adapter = get_adapter(config)
    with torch.device("meta"):  # count parameters without allocating weights
        params = count_parameters(auto_model_class(adapter).from_config(config))
    facts: dict[str, Any] = {**adapter.describe(config), "parameters": params}
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(
            f"{key:<{width}}  {value:,}"
            if isinstance(value, int) and not isinstance(value, bool)
            else f"{key:<{width}}  {value}"
        )
    print("\nmethods:")
    for name, spec in registered_methods().items():
        reason = spec.applicability(adapter)
        print(f"  {name:<12} {'applies' if reason is None else 'not applicable: ' + reason}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .registry import get_method, registered_methods

    specs = [get_method(args.name)] if args.name else list(registered_methods().values())
    for spec in specs:
        print(f"{spec.name}: {spec.summary}")
        for name, type_name, default, help_text in spec.fields():
            print(f"    {name:<22} {type_name:<46} default {default!r:<12} {help_text}")
        print()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.output), progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
