"""Answers of generation tasks: what a completion answers, and whether that is the gold answer.

An example's answer format is read from its data, never from its set's name:
- **choices**: the instruction ends "Answer format: a/b/c" (the LLM-Adapters commonsense sets:
  true/false, solution1/solution2, answer1…answer5, option1/option2, ending1…ending4): the answer is
  the first of those words in the completion, as the published protocol scores them (whole words; any
  case, since "True" answers as "true" does);
- **letters**: every gold answer of the split is one of the letters A–E (AQuA): the letter after the
  last "answer is", else the last standalone capital A–E;
- **numbers** otherwise (GSM8K, MultiArith, AddSub, SingleEq, mawps): math-verify reads the last
  number or expression of the line after the last answer marker ("####", "answer is"; else of the
  whole completion). It is correct when math-verify verifies it against the gold or the two differ by at
  most 1e-3 of the gold's magnitude (1e-3 at least): mawps's gold 1.8333333333333335 accepts 1.8333.

- **code** (HumanEval): the completion's first code block (or the completion, if it has none), its
  `if __name__` block and top-level example asserts and prints dropped; whether it is correct is
  decided by running it against the tests (lrft.sandbox), not here.

Each format also says when its answer is written (a regex over the completion), so generation stops
there instead of running on to max_new_tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTERS = ("A", "B", "C", "D", "E")
_FORMAT_LINE = re.compile(r"answer format:\s*([^\n]+?)\s*$", re.IGNORECASE)
_MARKER = re.compile(r"####|answer is", re.IGNORECASE)
RELATIVE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class AnswerFormat:
    kind: str  # "choices", "letters", "numbers" or "code"
    choices: tuple[str, ...] = ()  # the words (choices) or letters an answer is one of

    def extract(self, completion: str) -> str | None:
        """The answer a completion gives, normalised (a choice in the data's spelling, a number as
        math-verify writes it), or None when it gives none."""
        if self.kind == "code":
            return code_answer(completion)
        if self.kind == "choices":
            found = _words(self.choices).search(completion)
            return next(c for c in self.choices if c.lower() == found.group(0).lower()) if found else None
        tail = _after_last_marker(completion)
        if self.kind == "letters":
            if tail is not None:
                found = re.search(r"\b[A-E]\b", tail)
                return found.group(0) if found else None
            letters = re.findall(r"\b[A-E]\b", completion)
            return letters[-1] if letters else None
        parsed = _parse(completion if tail is None else tail)
        return parsed[-1] if parsed else None

    def correct(self, answer: str | None, gold: str | None) -> bool:
        if answer is None or gold is None or self.kind == "code":  # code: its tests decide (lrft.sandbox)
            return False
        if self.kind != "numbers":
            return answer.lower() == gold.lower()
        return numbers_agree(answer, gold)

    @property
    def written(self) -> str:
        """A regex the completion matches once its answer is complete (the character after it seen)."""
        if self.kind == "code":
            return r"```[\w+-]*\n[\s\S]*?```"  # the first code block closed
        if self.kind == "choices":
            return _words(self.choices).pattern + r"(?=\W)"
        if self.kind == "letters":
            return r"answer is\W*[A-E]\b(?=\W)"
        return r"(?:answer is|####)[^\n]*\d[^\n]*?(?:\.\s|\n)"


NUMBERS = AnswerFormat("numbers")
CODE = AnswerFormat("code")


def answer_format(instruction: str, golds: list[str | None]) -> AnswerFormat:
    """The format of an example with this instruction, in a split whose gold answers are `golds`."""
    line = _FORMAT_LINE.search(instruction.strip())
    if line:
        choices = tuple(c.strip() for c in line.group(1).split("/") if c.strip())
        if len(choices) >= 2:
            return AnswerFormat("choices", choices)
    if golds and all(g is not None and g.strip() in LETTERS for g in golds):
        return AnswerFormat("letters", LETTERS)
    return NUMBERS


def code_answer(completion: str) -> str | None:
    """The code a completion answers with, as the published pipelines extract it."""
    block = re.search(r"```[\w+-]*\n([\s\S]*?)(?:```|$)", completion)
    code = block.group(1) if block else completion
    code = re.split(r"^if __name__\s*==", code, maxsplit=1, flags=re.M)[0]
    kept = [line for line in code.split("\n") if not re.match(r"(assert|print)\b", line)]
    return "\n".join(kept).rstrip() or None


def numbers_agree(answer: str, gold: str) -> bool:
    """Whether two numeric answers are the same: math-verify's verdict, or within the tolerance."""
    from math_verify import verify

    a, g = _parse(answer), _parse(gold)
    if not a or not g:
        return False
    if verify(g, a):
        return True
    try:
        x, y = float(a[0]), float(g[0])
    except (TypeError, ValueError):  # a symbolic expression math-verify already compared
        return False
    return abs(x - y) <= RELATIVE_TOLERANCE * max(abs(y), 1.0)


def _parse(text: str) -> list:
    """math-verify's reading of a text: [expression, its string] for the last answer found, or []."""
    from math_verify import parse

    return parse(text)


def _after_last_marker(completion: str) -> str | None:
    """The first line of text after the last answer marker (what follows is another thought), or None
    if the completion has no marker."""
    markers = list(_MARKER.finditer(completion))
    if not markers:
        return None
    lines = [line for line in completion[markers[-1].end() :].split("\n") if line.strip()]
    return lines[0] if lines else ""


def _words(choices: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)
