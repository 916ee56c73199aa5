"""Causal-LM tasks: prompt/response examples, their tokenization with prompt labels masked, answers.

Tasks: `gsm8k` (question → worked answer, final answer after `####`) from `data.path`,
`$LRFT_DATA_DIR/gsm8k/{train,test}.jsonl` or the hub (openai/gsm8k); `instruction`, users' own
json/jsonl files in the alpaca layout (`instruction`, optional `input`, `output`) or the chat layout
(`messages` with roles, the last one the assistant's answer to learn).

A prompt is rendered with the tokenizer's chat template when it has one, else in a plain
"### Instruction / ### Response" format. The loss covers the response tokens only (prompt labels are
-100). Examples longer than `data.max_length` are cut at the end and counted; an example with no
response token left is left out with a warning, never trained on as an empty sequence.
"""

from __future__ import annotations

import os
from pathlib import Path

from lrft import console, hub
from lrft.data.answers import NUMBERS
from lrft.data.tasks import DATA_DIR_ENV, HUB_SOURCE, PromptSplit, TaskData
from lrft.data.user_files import find_split_file, read_records
from lrft.errors import LrftError

IGNORE = -100


# ----------------------------------------------------------------------------------------- loading


def load(task, data_cfg, need_train: bool):
    """TaskData of a causal-LM task."""

    if task.name == "gsm8k":
        local = (
            Path(data_cfg.path)
            if data_cfg.path
            else (Path(os.environ[DATA_DIR_ENV]) / "gsm8k" if os.environ.get(DATA_DIR_ENV) else None)
        )
        if local is None:
            return _gsm8k_hub(task, need_train)
        where = "data.path" if data_cfg.path else DATA_DIR_ENV
        files = {"train": local / "train.jsonl"} if need_train else {}
        files[""] = local / "test.jsonl"
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise LrftError(
                f"{where}: missing {', '.join(missing)}; a gsm8k dir holds train.jsonl and test.jsonl "
                f"(one {{question, answer}} object per line)"
            )
        splits = {k: _gsm8k_split(_records(f, ("question", "answer"))) for k, f in files.items()}
        return TaskData(task, splits.pop("train", PromptSplit([], [], [])), splits, None, str(local))
    if not data_cfg.path:
        raise LrftError(
            "data.path: the instruction task reads your files; set data.path to a dir with train.jsonl "
            "and dev.jsonl in the alpaca layout (instruction, input, output) or the chat layout (messages)"
        )
    path = Path(data_cfg.path)
    if not path.is_dir():
        raise LrftError(f"data.path: no directory at {path}; it should hold train.jsonl and dev.jsonl")
    train_file = find_split_file(path, ("train",), (".jsonl", ".json"))
    eval_file = find_split_file(path, ("dev", "validation", "test"), (".jsonl", ".json"))
    if (need_train and train_file is None) or eval_file is None:
        raise LrftError(f"data.path: {path} needs train and dev (or validation) files, as .jsonl or .json")
    train = _instruction_split(train_file) if need_train else PromptSplit([], [], [])
    return TaskData(task, train, {"": _instruction_split(eval_file)}, None, str(path))


def _gsm8k_hub(task, need_train: bool):
    hub.unreachable_reason()  # an unreachable hub: offline mode before datasets tries it
    import datasets

    try:
        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # offline, unknown dataset, ...: say what to do instead
        raise LrftError(
            f"data: gsm8k has no local dir and {hub.unavailable('openai/gsm8k (main)', e)}; set "
            f"{DATA_DIR_ENV} to a dir holding gsm8k/train.jsonl and test.jsonl, or the task's dir "
            f"with data.path (lrft eval and merge: --data-path)"
        ) from None

    def split(name: str) -> PromptSplit:
        return _gsm8k_split([(i + 1, r) for i, r in enumerate(ds[name])])

    return TaskData(
        task,
        split("train") if need_train else PromptSplit([], [], []),
        {"": split("test")},
        None,
        f"{HUB_SOURCE}openai/gsm8k/main",
    )


def _records(path: Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    out = []
    for line_no, rec, _ in read_records(path):
        missing = [k for k in required if not isinstance(rec.get(k), str)]
        if missing:
            raise LrftError(
                f"{path}:{line_no}: no text field {missing[0]!r} (fields: {', '.join(rec) or 'none'}); "
                f"every line needs {', '.join(required)}"
            )
        out.append((line_no, rec))
    if not out:
        raise LrftError(f"{path}: no examples in the file")
    return out


def _gsm8k_split(records) -> PromptSplit:
    prompts = [[{"role": "user", "content": r["question"]}] for _, r in records]
    responses = [r["answer"] for _, r in records]
    return PromptSplit(prompts, responses, [gold_answer(a) for a in responses])


def _instruction_split(path: Path) -> PromptSplit:
    prompts, responses = [], []
    for line_no, rec in _records(path):
        if "messages" in rec:
            msgs = rec["messages"]
            ok = (
                isinstance(msgs, list)
                and len(msgs) >= 2
                and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs
                )
            )
            if not ok or msgs[-1]["role"] != "assistant":
                raise LrftError(
                    f"{path}:{line_no}: 'messages' must be a list of {{role, content}} turns ending with "
                    f"the assistant's answer"
                )
            prompts.append([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]])
            responses.append(msgs[-1]["content"])
        elif isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
            extra = rec.get("input") or ""
            prompts.append([{"role": "user", "content": rec["instruction"] + (f"\n\n{extra}" if extra else "")}])
            responses.append(rec["output"])
        else:
            raise LrftError(
                f"{path}:{line_no}: expected the alpaca layout (instruction, input, output) or the chat "
                f"layout (messages); found fields {', '.join(rec) or 'none'}"
            )
    return PromptSplit(prompts, responses, [None] * len(prompts))


# ------------------------------------------------------------------------------------ tokenization


def render(tokenizer, prompt: list[dict], response: str | None) -> str:
    """The prompt (and response) as text: the chat template if the tokenizer has one, else a plain format."""
    if getattr(tokenizer, "chat_template", None):
        if response is None:
            return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    turns = "".join(
        f"### {'Instruction' if m['role'] == 'user' else m['role'].capitalize()}:\n{m['content']}\n\n" for m in prompt
    )
    text = f"{turns}### Response:\n"
    return text if response is None else text + response + (tokenizer.eos_token or "")


def prompt_response_ids(tokenizer, prompts: list[list[dict]], responses: list[str]) -> list[tuple[list, list]]:
    """(prompt ids, response ids) per example, rendered as the model will read them: the response ids
    are what follows the rendered prompt in the rendered dialogue (its end-of-turn tokens included)."""
    prompt_text = [render(tokenizer, p, None) for p in prompts]
    full_text = [render(tokenizer, p, r) for p, r in zip(prompts, responses)]
    special = not getattr(tokenizer, "chat_template", None)  # a template writes its own special tokens
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"] if prompts else []
    full_ids = tokenizer(full_text, add_special_tokens=special)["input_ids"] if prompts else []
    out = []
    for p_ids, f_ids, p_text, f_text in zip(prompt_ids, full_ids, prompt_text, full_text):
        if f_ids[: len(p_ids)] != p_ids:  # the boundary merged into one token: tokenize the response apart
            f_ids = p_ids + tokenizer(f_text[len(p_text) :], add_special_tokens=False)["input_ids"]
        out.append((p_ids, f_ids[len(p_ids) :]))
    return out


def encode_prompts(split: PromptSplit, tokenizer, max_length: int, what: str = "examples") -> list[dict]:
    """Training features: input ids of prompt + response, labels -100 on the prompt, cut to max_length."""
    features, cut, empty = [], 0, 0
    for p_ids, r_ids in prompt_response_ids(tokenizer, split.prompts, split.responses):
        f_ids, labels = p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids
        if len(f_ids) > max_length:
            cut += 1
            f_ids, labels = f_ids[:max_length], labels[:max_length]
        if all(t == IGNORE for t in labels):
            empty += 1
            continue
        features.append({"input_ids": f_ids, "attention_mask": [1] * len(f_ids), "labels": labels})
    warn_cut(cut, empty, len(split), what, max_length, "kept no response token")
    if not features and len(split):
        raise LrftError(
            f"data.max_length: {max_length} tokens leave no response token to learn in any of the "
            f"{len(split)} {what}; raise data.max_length"
        )
    return features


def encoder_text(tokenizer, prompt: list[dict]) -> str:
    """What an encoder-decoder's encoder reads of a prompt: the rendered chat if the tokenizer has a
    template, else the turns' texts as they are (as T5 and BART read their inputs)."""
    if getattr(tokenizer, "chat_template", None):
        return render(tokenizer, prompt, None)
    return "\n\n".join(m["content"] for m in prompt)


def encode_seq2seq(split: PromptSplit, tokenizer, max_length: int, what: str = "examples") -> list[dict]:
    """Features of an encoder-decoder: the prompt's ids for the encoder, the response's (with the
    tokenizer's end token) as the decoder's labels, each cut to max_length."""
    sources = tokenizer([encoder_text(tokenizer, p) for p in split.prompts])["input_ids"] if len(split) else []
    targets = tokenizer(text_target=split.responses)["input_ids"] if len(split) else []
    features, cut = [], 0
    for ids, labels in zip(sources, targets):
        cut += len(ids) > max_length or len(labels) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    warn_cut(cut, 0, len(split), what, max_length, "")
    return features


def choice_features(split: PromptSplit, tokenizer, max_length: int, encoder_decoder: bool = False) -> list[dict]:
    """Features of every example's prompt with each of its candidate answers (split.responses), one per
    pair and never left out: a prompt too long keeps its last tokens, so the answer always fits."""
    if encoder_decoder:
        return encode_seq2seq(split, tokenizer, max_length, "candidate answers")
    features, cut = [], 0
    for p_ids, r_ids in prompt_response_ids(tokenizer, split.prompts, split.responses):
        r_ids = r_ids[: max_length - 1]
        room = max_length - len(r_ids)
        cut += len(p_ids) > room
        p_ids = p_ids[-room:]
        ids, labels = p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if cut:
        console.warn(
            f"{cut} prompts of {len(split)} candidate answers were cut to their last tokens to fit data.max_length"
        )
    return features


def warn_cut(cut: int, empty: int, total: int, what: str, max_length: int, why_empty: str) -> None:
    """The one warning of a tokenized split: how many of its `total` examples data.max_length cut, and
    how many were left out (`why_empty`)."""
    if cut or empty:
        console.warn(
            f"{cut} of {total} {what} were cut to data.max_length={max_length} tokens"
            + (f"; {empty} {why_empty} and were left out" if empty else "")
        )


def prompt_features(split: PromptSplit, tokenizer, encoder_decoder: bool = False) -> list[dict]:
    """Generation inputs: the rendered prompt's ids, the user's question, the gold answer, its format and
    the context the answer is read with (if any)."""
    special = not getattr(tokenizer, "chat_template", None)
    if encoder_decoder:  # the encoder reads the prompt with the tokenizer's own special tokens
        ids = tokenizer([encoder_text(tokenizer, p) for p in split.prompts])["input_ids"]
    else:
        texts = [render(tokenizer, p, None) for p in split.prompts]
        ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    return [
        {"prompt_ids": ids[n], "prompt": p[-1]["content"], "gold": a, "format": split.answer_format(n)}
        | ({"context": split.contexts[n]} if split.contexts else {})
        for n, (p, a) in enumerate(zip(split.prompts, split.answers))
    ]


# ----------------------------------------------------------------------------------------- answers


def gold_answer(answer: str) -> str | None:
    """GSM8K's final answer: the number after '####' (None without one), read as completions are."""
    _, sep, tail = answer.rpartition("####")
    return NUMBERS.extract(tail) if sep else None
