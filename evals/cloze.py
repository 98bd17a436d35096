"""A small, real multiple-choice set cut from real text: "which word comes next?" (a cloze task).

Each item is a passage of ``context_words`` consecutive words from the text (the question), the
word that really follows it (the correct choice) and ``num_choices - 1`` distractors: other words of
the same text with a similar frequency and length, so that neither how common a word is nor how
long it is gives the answer away. The position of the correct choice is drawn from the seed.

Everything is deterministic for a given text and seed. The rows have the shape
:func:`hf_prune.evals.multiple_choice.evaluate_multiple_choice` reads::

    {"question": "Once upon a time there was a little boy named Ben. Ben loved to",
     "choices": ["swim", "explore", "smile", "laugh"], "answer": 1}

Command line (writes JSONL)::

    python -m hf_prune.evals.cloze TEXT_FILE OUT.jsonl --num-items 200 --seed 0

Build sets from corpora at run time (tests write them to a temporary folder); do not commit sets
derived from third-party text into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# Same marker as ``hf_prune.evals.perplexity.DEFAULT_DOCUMENT_SEPARATOR`` (raw TinyStories dumps
# put it between stories); passages never cross it.
DEFAULT_DOCUMENT_SEPARATOR = "<|endoftext|>"

_WORD = re.compile(r"\S+")
# Distractors are drawn at random from this many nearest words (by frequency and length), so that
# the set does not always pair a word with the very same neighbours.
_NEIGHBOURS_PER_DISTRACTOR = 3


def build_cloze_items(
    text: str,
    *,
    num_items: int,
    num_choices: int = 4,
    seed: int = 0,
    context_words: int = 24,
    document_separator: str | None = DEFAULT_DOCUMENT_SEPARATOR,
) -> list[dict]:
    """Cut ``num_items`` next-word multiple-choice items out of ``text``.

    Args:
        text: the source text; words are runs of non-whitespace.
        num_items: how many items to build; an error says how many the text allows if it is too many.
        num_choices: choices per item (the answer plus ``num_choices - 1`` distractors), >= 2.
        seed: seeds the choice of passages, distractors and answer positions.
        context_words: words of context in each question, >= 1.
        document_separator: literal marker between documents; passages never span one, and the
            marker itself never appears in an item. ``None`` treats the text as one document.

    Returns:
        Items ``{"question": str, "choices": [str, ...], "answer": int}`` in text order. The question
        is the passage exactly as it appears in the text (inner line breaks kept, no trailing
        whitespace); the answer is the next word, which is always purely alphabetic (so that its
        punctuation is not a clue), and the evaluator puts a space between question and choice.
        Distractors are lowercase-distinct from the answer and from each other, take the
        answer's capitalisation (so a capital letter at a sentence start is no clue), and are the
        words whose (log frequency, length) is nearest the answer's, sampled with the seed.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if num_choices < 2:
        raise ValueError(
            f"num_choices must be >= 2 (an answer and at least one distractor), got {num_choices}"
        )
    if context_words < 1:
        raise ValueError(f"context_words must be >= 1, got {context_words}")

    documents = text.split(document_separator) if document_separator else [text]
    # (question, answer) for every word that has ``context_words`` words of the same document before it.
    candidates: list[tuple[str, str]] = []
    counts: Counter[str] = Counter()
    surface: dict[str, Counter[str]] = {}
    for document in documents:
        words = list(_WORD.finditer(document))
        for match in words:
            word = match.group()
            if _is_plain_word(word):
                counts[word.lower()] += 1
                surface.setdefault(word.lower(), Counter())[word] += 1
        for index in range(context_words, len(words)):
            answer = words[index].group()
            if not _is_plain_word(answer):
                continue
            start = words[index - context_words].start()
            end = words[index - 1].end()
            candidates.append((document[start:end], answer))

    if len(counts) < num_choices:
        raise ValueError(
            f"the text has only {len(counts)} distinct alphabetic word(s); "
            f"{num_choices} choices per item need at least {num_choices}"
        )
    if len(candidates) < num_items:
        raise ValueError(
            f"the text allows only {len(candidates)} item(s) with {context_words} words of context "
            f"followed by an alphabetic word; asked for {num_items}"
        )

    # Most frequent spelling of each word (ties: alphabetical).
    neighbours = _Neighbours(counts)
    spelling = {
        word: min(forms.items(), key=lambda item: (-item[1], item[0]))[0] for word, forms in surface.items()
    }

    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(candidates)), num_items))
    items = []
    for candidate_index in chosen:
        question, answer = candidates[candidate_index]
        distractors = neighbours.pick(answer.lower(), num_choices - 1, rng)
        choices = [_match_case(spelling[word], answer) for word in distractors]
        answer_index = rng.randrange(num_choices)
        choices.insert(answer_index, answer)
        items.append({"question": question, "choices": choices, "answer": answer_index})
    return items


def write_jsonl(items: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write ``items`` one JSON object a line (UTF-8, non-ASCII kept as is); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


def _is_plain_word(word: str) -> bool:
    return word.isalpha()


class _Neighbours:
    """Words of the text ranked by closeness in (log frequency, length) to a given word."""

    def __init__(self, counts: Counter[str]):
        self.words = sorted(counts)  # alphabetical: ties in distance break the same way every run
        self.log_count = np.log(np.array([counts[word] for word in self.words], dtype=np.float64))
        self.length = np.array([len(word) for word in self.words], dtype=np.float64)
        self.index = {word: position for position, word in enumerate(self.words)}

    def pick(self, answer: str, how_many: int, rng: random.Random) -> list[str]:
        """``how_many`` words other than ``answer`` (lowercase) among its nearest, picked with ``rng``."""
        position = self.index[answer]
        # One step in log frequency (a factor e) weighs as much as one character of length.
        distance = np.abs(self.log_count - self.log_count[position]) + np.abs(
            self.length - self.length[position]
        )
        distance[position] = np.inf
        order = np.argsort(distance, kind="stable")
        pool = [self.words[i] for i in order[: how_many * _NEIGHBOURS_PER_DISTRACTOR]]
        return rng.sample(pool, how_many)


def _match_case(word: str, answer: str) -> str:
    """``word`` written with the answer's capitalisation pattern (all caps, capitalised or lowercase)."""
    if answer.isupper() and len(answer) > 1:
        return word.upper()
    if answer[:1].isupper():
        return word[:1].upper() + word[1:].lower()
    return word.lower()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_prune.evals.cloze",
        description="Build a next-word multiple-choice (cloze) set from a text file and write it as JSONL.",
    )
    parser.add_argument("text_file", help="UTF-8 text file to cut passages from")
    parser.add_argument("out", help="JSONL file to write (rows: question, choices, answer)")
    parser.add_argument("--num-items", type=int, default=200, help="items to build (default: 200)")
    parser.add_argument("--num-choices", type=int, default=4, help="choices per item (default: 4)")
    parser.add_argument(
        "--context-words", type=int, default=24, help="words of context per question (default: 24)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--document-separator",
        default=DEFAULT_DOCUMENT_SEPARATOR,
        help="literal marker between documents; passages never span it "
        f"(default: {DEFAULT_DOCUMENT_SEPARATOR!r}; '' for none)",
    )
    args = parser.parse_args(argv)

    source = Path(args.text_file)
    if not source.is_file():
        parser.error(f"text file not found: {args.text_file}")
    try:
        items = build_cloze_items(
            source.read_text(encoding="utf-8"),
            num_items=args.num_items,
            num_choices=args.num_choices,
            seed=args.seed,
            context_words=args.context_words,
            document_separator=args.document_separator or None,
        )
    except ValueError as exc:
        parser.error(f"{args.text_file}: {exc}")
    write_jsonl(items, args.out)
    print(f"wrote {len(items)} items with {args.num_choices} choices to {args.out}")
    return 0


__all__ = ["DEFAULT_DOCUMENT_SEPARATOR", "build_cloze_items", "write_jsonl"]


if __name__ == "__main__":
    raise SystemExit(main())
