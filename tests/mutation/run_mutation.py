"""Mutation testing of the core math with mutmut: ``make mutation`` (all groups) or
``python tests/mutation/run_mutation.py GROUP [GROUP ...]``.

A group is a few product modules and the fast tests that should catch a planted bug in them. For each
group this copies the project to ``<workdir>/<group>/`` (outside the repository, so mutmut's
``mutants/`` tree never lands in it), writes a ``[tool.mutmut]`` section naming only that group's
modules and tests, runs ``mutmut run`` there and prints, per module, how many mutants the tests killed.

Survivors that are *equivalent* mutants (no input can tell them from the original), and those only a
GPU run could kill (a dropped ``device=``), are listed with a reason in ``equivalent_mutants.py`` beside
this file; the kill rate leaves them out, the raw rate does not. Anything else that survives is a gap in
the tests. ``--show-survivors`` prints each survivor's diff. Not part of CI: a full run of every group
takes hours on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# The copy has the installed layout (setup.py's package_dir): model_patches/, integrations/ and evals/ live
# inside hf_prune/. Otherwise `hf_prune.model_patches` would resolve through the editable install to the
# repository's unmutated files, and the mutants there would never run.
INSTALLED_AS = {
    "hf_prune": "hf_prune",
    "model_patches": "hf_prune/model_patches",
    "integrations": "hf_prune/integrations",
    "evals": "hf_prune/evals",
}
COPIED = ["tests", "setup.cfg", "setup.py", "pyproject.toml"]

# group -> (modules mutated, tests run against each mutant). Tests are the fast ones that check the math;
# mutmut runs, for each mutant, only those of them that reach the mutated function.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "depth": (
        [
            "hf_prune/methods/depth/estimators.py",
            "hf_prune/methods/depth/replaceme.py",
            "hf_prune/methods/depth/cuts.py",
        ],
        [
            "tests/unit/test_estimators.py",
            "tests/methods/test_replaceme_references.py",
            "tests/methods/test_depth_estimators_and_cuts.py",
            "tests/methods/test_depth_config.py",
        ],
    ),
    "visual": (
        [
            "model_patches/token_selection.py",
            "model_patches/visual_token_scoring.py",
            "model_patches/clip_relevance.py",
        ],
        ["tests/methods/test_visual_tokens.py", "tests/methods/test_clip_relevance.py"],
    ),
    "experts": (
        [
            "hf_prune/methods/experts/scoring.py",
            "hf_prune/methods/experts/removal.py",
            "model_patches/nonuniform_moe.py",
        ],
        [
            "tests/methods/test_expert_math.py",
            "tests/methods/test_expert_units.py",
            "tests/methods/test_expert_scoring.py",
            "tests/methods/test_expert_removal.py",
            # The reload tests run the saved remote-code copy of nonuniform_moe.py in a fresh process, where
            # mutmut's trampolines find no mutmut configuration: left out (test_saved_folders still checks
            # the copy is the module's text).
            "-k",
            "not reload_matches_in_memory",
        ],
    ),
    # DiEP's training (both engines share diep.py); its own group, so it can run without the hours of the
    # experts group.
    "diep": (
        ["hf_prune/methods/experts/diep.py"],
        ["tests/methods/test_expert_math.py", "tests/methods/test_expert_units.py"],
    ),
    # DiEP layer by layer, against the in-memory path on tiny models (~20 s per mutant; the kill-and-restart
    # test runs a fresh process: left out).
    "diep_layerwise": (
        ["hf_prune/methods/experts/diep_sequential.py"],
        ["tests/engine/test_sequential_diep.py", "-m", "not slow"],
    ),
    # Expert pruning by router statistics layer by layer, against the in-memory path on every MoE family.
    "experts_layerwise": (
        ["hf_prune/methods/experts/sequential.py"],
        ["tests/engine/test_sequential_experts.py", "tests/engine/test_sequential_diep.py", "-m", "not slow"],
    ),
    # The prompt retainer's training (the gradient against autograd of the whole loss, with and without
    # checkpointing; the pipeline's training; both engines; weights read from disk only while they run).
    "prompt_retainer": (
        ["hf_prune/methods/tokens/prompt_retainer_training.py"],
        ["tests/methods/test_prompt_retainer.py", "tests/engine/test_sequential_tokens.py", "-m", "not slow"],
    ),
    "sparsity": (
        ["hf_prune/methods/sparsity/schedules.py", "hf_prune/methods/sparsity/masks.py"],
        ["tests/methods/test_sparsity_masks.py"],
    ),
    "healing": (
        ["hf_prune/methods/healing/lora_heal.py", "hf_prune/methods/healing/lora_training.py"],
        # The fresh-process reload and the real-model test are slow; the rest trains tiny models in seconds.
        ["tests/methods/test_heal.py", "-m", "not slow", "-k", "not stories260k"],
    ),
    "graphon": (
        [
            "hf_prune/analysis/graphon.py",
            "hf_prune/analysis/graphon_ntk.py",
            "hf_prune/analysis/pai_scorers.py",
        ],
        ["tests/analysis/test_graphon.py", "tests/analysis/test_pai_scorers.py", "-m", "not slow"],
    ),
    "cards": (
        [
            "hf_prune/methods/robust/augmentations.py",
            "hf_prune/methods/robust/deck.py",
            "hf_prune/methods/robust/cards.py",
            "model_patches/card_deck.py",
        ],
        # The fresh-process reload and the pipeline are slow; the lottery rounds train tiny ViTs in seconds.
        [
            "tests/methods/test_augmentations.py",
            "tests/methods/test_card_deck.py",
            "tests/methods/test_cards.py",
            "-k",
            "not reloads and not pipeline",
        ],
    ),
    "tokens": (
        [
            "model_patches/prompt_prefill.py",
            "model_patches/prompt_retainer.py",
            "model_patches/text_token_pruning.py",
        ],
        [
            "tests/methods/test_token_masks.py",
            "tests/methods/test_token_selection.py",
            "tests/methods/test_encoder_forward.py",
        ],
    ),
}

KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def installed_path(module: str) -> str:
    """``model_patches/x.py`` -> ``hf_prune/model_patches/x.py``: where the module lives in the copy."""
    top, _, rest = module.partition("/")
    return f"{INSTALLED_AS[top]}/{rest}"


def mutmut_section(modules: list[str], tests: list[str]) -> str:
    quoted = lambda items: "[" + ", ".join(json.dumps(i) for i in items) + "]"  # noqa: E731
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["hf_prune/"]\n'
        f"only_mutate = {quoted([installed_path(m) for m in modules])}\n"
        f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        # torch is not fork-safe once it has run threads: fork each mutant from a clean server process.
        'process_isolation = "forkserver"\n'
    )


def copy_project(dest: Path) -> None:
    """Refresh the copy of the project in ``dest`` (mutmut's ``mutants/`` cache there is kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    if (dest / "hf_prune").exists():
        shutil.rmtree(dest / "hf_prune")
    for name, installed in INSTALLED_AS.items():
        shutil.copytree(REPO / name, dest / installed, ignore=ignore)
    for name in COPIED:
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)


def statuses(work: Path, modules: list[str]) -> dict[str, dict[str, str]]:
    """module -> {mutant name: status}, read from the ``.meta`` files mutmut writes beside each mutant file."""
    from mutmut.stats import status_by_exit_code

    result = {}
    for module in modules:
        meta = work / "mutants" / (installed_path(module) + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        result[module] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return result


#: Per work folder: the hash of each mutated module's source at the last run.
SOURCES_FILE = "hf_prune_sources.json"


def source_hashes(modules: list[str]) -> dict[str, str]:
    return {m: hashlib.sha256((REPO / m).read_bytes()).hexdigest() for m in modules}


def keep_earlier_kills(
    by_module: dict[str, dict[str, str]], earlier: dict[str, dict[str, str]], work: Path, modules: list[str]
) -> None:
    """A rerun tests only earlier survivors; mutmut starts its records afresh when a module's file was
    touched, so the mutants killed before would read "not checked". Keep their earlier status when the
    module's source is the same as at the last run (the same source gives the same mutants)."""
    recorded = work / SOURCES_FILE
    if not recorded.exists():
        return
    before, now = json.loads(recorded.read_text()), source_hashes(modules)
    for module in modules:
        if before.get(module) != now[module]:
            continue
        for name, status in earlier.get(module, {}).items():
            if status in KILLED and by_module[module].get(name) == "not checked":
                by_module[module][name] = status


def load_exclusions() -> tuple[dict[str, str], dict[str, str]]:
    """(equivalent mutants, mutants only an accelerator could kill), each name -> reason
    (``equivalent_mutants.py``)."""
    sys.path.insert(0, str(HERE))
    from equivalent_mutants import EQUIVALENT_MUTANTS, NEEDS_ACCELERATOR

    return EQUIVALENT_MUTANTS, NEEDS_ACCELERATOR


def report(group: str, by_module: dict[str, dict[str, str]], excluded: tuple[dict, dict]) -> list[str]:
    """Print the table of one group; return the names of the survivors nobody has explained."""
    equivalents, needs_accelerator = excluded
    print(f"\n== {group}")
    print(
        f"{'module':44} {'mutants':>7} {'killed':>6} {'equiv.':>6} {'gpu':>4} {'not run':>7} {'left':>5}"
        f" {'kill rate':>9}  (raw)"
    )
    survivors = []
    for module, status_by_name in by_module.items():
        total = len(status_by_name)
        killed = sum(s in KILLED for s in status_by_name.values())
        not_run = sum(s == "not checked" for s in status_by_name.values())
        alive = [n for n, s in status_by_name.items() if s not in KILLED and s != "not checked"]
        equivalent = [n for n in alive if n in equivalents]
        gpu_only = [n for n in alive if n in needs_accelerator]
        left = [n for n in alive if n not in equivalents and n not in needs_accelerator]
        survivors += left
        counted = total - len(equivalent) - len(gpu_only)
        rate = killed / counted if counted else float("nan")
        raw = killed / total if total else float("nan")
        print(
            f"{module:44} {total:7d} {killed:6d} {len(equivalent):6d} {len(gpu_only):4d} {not_run:7d}"
            f" {len(left):5d} {rate:9.1%}  ({raw:.1%})"
        )
        other = Counter(status_by_name[n] for n in left if status_by_name[n] != "survived")
        if other:
            print(f"{'':44} of the left, not survived but: {dict(other)}")
        if not_run:
            print(f"{'':44} incomplete: {not_run} mutants not run yet (the rate counts them as not killed)")
    alive_anywhere = {
        n for status_by_name in by_module.values() for n, s in status_by_name.items() if s not in KILLED
    }
    prefixes = tuple(installed_path(m)[: -len(".py")].replace("/", ".") + "." for m in by_module)
    stale = [
        n for n in (*equivalents, *needs_accelerator) if n.startswith(prefixes) and n not in alive_anywhere
    ]
    for name in stale:
        print(f"note: {name} is listed in equivalent_mutants.py but is killed or no longer exists; remove it")
    return survivors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  make mutation\n  python tests/mutation/run_mutation.py depth --show-survivors\n"
        "  python tests/mutation/run_mutation.py visual --rerun-survivors",
    )
    parser.add_argument(
        "groups", nargs="*", metavar="GROUP", help=f"any of {', '.join(GROUPS)} (default: all)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("HF_PRUNE_MUTATION_DIR", Path.home() / ".cache/hf-prune/mutation")),
        help="where the project copies and mutmut's results live (default ~/.cache/hf-prune/mutation)",
    )
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="keep earlier results and test again only the mutants that survived last time (after adding tests)",
    )
    parser.add_argument(
        "--show-survivors", action="store_true", help="print the diff of every surviving mutant"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: print the table of the last run in --workdir"
    )
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group {', '.join(unknown)}; the groups are {', '.join(GROUPS)}")
    groups = args.groups or list(GROUPS)
    if importlib.util.find_spec("mutmut") is None:
        parser.error("mutmut is not installed: `pip install mutmut==3.8.1` (or run `make mutation`)")
    mutmut = [sys.executable, "-m", "mutmut"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    excluded = load_exclusions()
    summary = {}
    for group in groups:
        modules, tests = GROUPS[group]
        work = args.workdir / group
        earlier = statuses(work, modules) if args.rerun_survivors else {}
        # survivors and mutants an interrupted run never reached
        rerun = [n for by_name in earlier.values() for n, s in by_name.items() if s not in KILLED]
        if args.report_only:
            report(group, statuses(work, modules), excluded)
            continue
        if not args.rerun_survivors and (work / "mutants").exists():
            shutil.rmtree(work / "mutants")
        copy_project(work)
        with open(work / "pyproject.toml", "a") as f:
            f.write(mutmut_section(modules, tests))
        print(f"[{group}] mutating {', '.join(modules)} in {work}", flush=True)
        if args.rerun_survivors and not rerun:
            print(f"[{group}] no earlier survivors to rerun")
        else:
            command = [*mutmut, "run", "--max-children", str(args.max_children), *rerun]
            with open(work / "mutmut.log", "w") as log:
                done = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            # mutmut redraws a spinner with \r: keep the last state of each line
            lines = [line.split("\r")[-1] for line in (work / "mutmut.log").read_text().splitlines()]
            if done.returncode != 0 or any(line.startswith("Stopping early") for line in lines):
                print("\n".join(lines[-15:]), file=sys.stderr)
                print(
                    f"[{group}] mutmut failed; its whole output is in {work / 'mutmut.log'}", file=sys.stderr
                )
                return done.returncode or 1
        by_module = statuses(work, modules)
        if args.rerun_survivors:
            keep_earlier_kills(by_module, earlier, work, modules)
        (work / SOURCES_FILE).write_text(json.dumps(source_hashes(modules)))
        survivors = report(group, by_module, excluded)
        summary[group] = {m: dict(Counter(s.values())) for m, s in by_module.items()}
        if args.show_survivors:
            for name in survivors:
                subprocess.run([*mutmut, "show", name], cwd=work, env=env)
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
