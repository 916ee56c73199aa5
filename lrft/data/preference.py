"""Preference pairs: reading them, tokenizing each pair's two dialogues, batching pairs whole.

`data.task: preference` reads `data.path` (else `$LRFT_DATA_DIR/preference/hh_harmless`): a json or
jsonl file (`.gz` too), or a dir holding train and test (or dev, validation) files, or a dir holding
one file, which is then split deterministically: a pair is held out when a hash of its text falls
under `data.eval_fraction`, so the split does not depend on the file's order or on a seed and every run
on that file evaluates on the same pairs. A record is one of:

- `prompt`, `chosen`, `rejected` as strings (the prompt a user turn), or as chat `messages` lists
  (TRL's conversational layout: `prompt` the turns before, `chosen`/`rejected` the assistant's reply);
- `chosen` and `rejected` only, whole dialogues sharing every turn but the last assistant reply:
  chat lists, or Anthropic HH's "\\n\\nHuman: … \\n\\nAssistant: …" text, split into turns there.

Pairs whose responses are identical or empty, or whose dialogues differ before their last reply, are
left out with a count. Tokenization renders the prompt as the causal tasks do (the chat template);
a pair longer than `data.max_length` keeps the end of its prompt (at most `data.max_prompt_length`
tokens) and the start of its responses, counted in a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from lrft import console
from lrft.data.causal import IGNORE, prompt_response_ids, warn_cut
from lrft.data.tasks import DATA_DIR_ENV, PreferenceSplit, TaskData
from lrft.data.user_files import find_split_file, read_records, record_format
from lrft.errors import LrftError

PAIR_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
DEFAULT_DIR = ("preference", "hh_harmless")  # under $LRFT_DATA_DIR
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------------------------------- loading


def load(task, data_cfg, need_train: bool) -> TaskData:
    """TaskData of the preference task: train and held-out pairs."""
    where, path = _location(data_cfg)
    if path.is_file():
        train_file, eval_file = path, None
    elif path.is_dir():
        train_file = find_split_file(path, ("train",), PAIR_SUFFIXES)
        eval_file = find_split_file(path, ("test", "dev", "validation"), PAIR_SUFFIXES)
        if train_file is None and eval_file is None:
            files = sorted(f for f in path.iterdir() if f.is_file() and record_format(f) in (".jsonl", ".json"))
            if len(files) != 1:
                raise LrftError(
                    f"{where}: {path} holds {len(files)} json/jsonl files; give it train and test files, "
                    f"or one file to split, or point {where} at the file"
                )
            train_file = files[0]
        elif eval_file is None or (need_train and train_file is None):
            raise LrftError(
                f"{where}: {path} needs both a train and a test (or dev) file of pairs, or one file to split"
            )
    else:
        raise LrftError(f"{where}: no file or dir at {path}; give a json/jsonl file of pairs or a dir of them")
    if eval_file is None:  # one file: hold out a deterministic share of it
        train, held_out = _hash_split(read_pairs(train_file), data_cfg.eval_fraction)
    else:
        train = read_pairs(train_file) if need_train else PreferenceSplit([], [], [])
        held_out = read_pairs(eval_file)
    return TaskData(task, train if need_train else PreferenceSplit([], [], []), {"": held_out}, None, str(path))


def _location(data_cfg) -> tuple[str, Path]:
    if data_cfg.path:
        return "data.path", Path(data_cfg.path)
    if os.environ.get(DATA_DIR_ENV):
        return DATA_DIR_ENV, Path(os.environ[DATA_DIR_ENV]).joinpath(*DEFAULT_DIR)
    raise LrftError(
        "data.path: the preference task reads pairs from a file; set data.path to a json/jsonl file (or dir) "
        f"of prompt/chosen/rejected pairs, or {DATA_DIR_ENV} to a dir holding {'/'.join(DEFAULT_DIR)}"
    )


def _hash_split(pairs: PreferenceSplit, fraction: float) -> tuple[PreferenceSplit, PreferenceSplit]:
    def held_out(i: int) -> bool:
        text = json.dumps([pairs.prompts[i], pairs.chosen[i], pairs.rejected[i]], ensure_ascii=False)
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) < fraction * 16**8

    parts: tuple[list[int], list[int]] = ([], [])
    for i in range(len(pairs)):
        parts[held_out(i)].append(i)
    return tuple(  # type: ignore[return-value]
        PreferenceSplit(*([getattr(pairs, f)[i] for i in idx] for f in ("prompts", "chosen", "rejected")))
        for idx in parts
    )


def read_pairs(path: Path) -> PreferenceSplit:
    """The usable pairs of a file; a record that is no pair is an error naming its line."""
    pairs = PreferenceSplit([], [], [])
    left_out = {"identical responses": 0, "an empty response": 0, "dialogues that differ before the last reply": 0}
    for line_no, rec, _ in read_records(path):
        prompt, chosen, rejected = _pair(rec, f"{path}:{line_no}")
        if prompt is None:
            left_out["dialogues that differ before the last reply"] += 1
        elif not chosen.strip() or not rejected.strip():
            left_out["an empty response"] += 1
        elif chosen == rejected:
            left_out["identical responses"] += 1
        else:
            pairs.prompts.append(prompt)
            pairs.chosen.append(chosen)
            pairs.rejected.append(rejected)
    if any(left_out.values()):
        counts = ", ".join(f"{n} with {why}" for why, n in left_out.items() if n)
        console.warn(f"{path}: left out {sum(left_out.values())} pairs ({counts})")
    if not pairs.prompts:
        raise LrftError(f"{path}: no usable preference pair in the file (each needs chosen and rejected responses)")
    return pairs


def _pair(rec: dict, where: str) -> tuple[list[dict] | None, str, str]:
    """(prompt turns, chosen, rejected) of a record; prompt None when the dialogues' prefixes differ."""
    missing = [k for k in SIDES if k not in rec]
    if missing:
        raise LrftError(
            f"{where}: no field {missing[0]!r} (fields: {', '.join(rec) or 'none'}); a pair needs chosen and "
            "rejected (and prompt, unless both are whole dialogues)"
        )
    sides = [_turns(rec[k], f"{where}: field {k!r}") for k in SIDES]
    if "prompt" in rec:
        prompt = _turns(rec["prompt"], f"{where}: field 'prompt'", role="user")
        replies = [s[-1]["content"] if len(s) == 1 and s[0]["role"] == "assistant" else None for s in sides]
        if None in replies:
            raise LrftError(f"{where}: with a prompt, chosen and rejected are each one assistant reply (a text)")
        return prompt, replies[0], replies[1]
    for k, turns in zip(SIDES, sides):
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise LrftError(
                f"{where}: field {k!r} is no dialogue ending with an assistant reply; give a 'prompt' "
                "field, or whole dialogues in both chosen and rejected"
            )
    shared = sides[0][:-1] == sides[1][:-1]
    return (sides[0][:-1] if shared else None), sides[0][-1]["content"], sides[1][-1]["content"]


def _turns(value, where: str, role: str = "assistant") -> list[dict]:
    """Chat turns of a field: a messages list, an HH dialogue text, or a plain text (one turn of `role`)."""
    if isinstance(value, str):
        parts = HH_TURN.split(value)
        if len(parts) > 1 and not parts[0].strip():
            return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]
        return [{"role": role, "content": value}]
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )
    if not ok:
        raise LrftError(f"{where} is {json.dumps(value)[:40]}; give a text or a list of {{role, content}} turns")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ------------------------------------------------------------------------------------ tokenization


def encode_pairs(split: PreferenceSplit, tokenizer, max_length: int, max_prompt_length: int, what: str) -> list[dict]:
    """A feature per pair: each side's input ids (prompt + response) and labels (-100 on the prompt).

    A pair longer than max_length keeps the last max_prompt_length tokens of its prompt, then as many
    of each response's first tokens as fit; a pair left with no response token is left out."""
    chosen = prompt_response_ids(tokenizer, split.prompts, split.chosen)
    rejected = prompt_response_ids(tokenizer, split.prompts, split.rejected)
    features, cut, empty = [], 0, 0
    for (p_ids, c_ids), (_, r_ids) in zip(chosen, rejected):
        if len(p_ids) + max(len(c_ids), len(r_ids)) > max_length:
            cut += 1
            p_ids = p_ids[-max_prompt_length:]
            room = max_length - len(p_ids)
            c_ids, r_ids = c_ids[:room], r_ids[:room]
        if not c_ids or not r_ids or c_ids == r_ids:
            empty += 1
            continue
        feature = {}
        for side, ids in zip(SIDES, (c_ids, r_ids)):
            feature[f"{side}_input_ids"] = p_ids + ids
            feature[f"{side}_labels"] = [IGNORE] * len(p_ids) + ids
        features.append(feature)
    warn_cut(cut, empty, len(split), what, max_length, "kept no response token that tells their sides apart")
    if not features and len(split):
        raise LrftError(
            f"data.max_length: {max_length} tokens (prompts cut to data.max_prompt_length={max_prompt_length}) "
            f"leave no response token in any of the {len(split)} {what}; raise data.max_length"
        )
    return features


def pair_length(feature: dict) -> int:
    """A pair's length in a batch: its longer side."""
    return max(len(feature["chosen_input_ids"]), len(feature["rejected_input_ids"]))


class PairCollator:
    """Pads a list of pairs into one batch of 2·n sequences, the n chosen rows first, then the n rejected
    (one forward pass for both); right padding, labels padded with -100. Reference log-probs the pairs
    carry (`ref_chosen`, `ref_rejected`: summed over response tokens) come along as `ref_logps`."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [p[f"{s}_input_ids"] for s in SIDES for p in pairs]
        labels = [p[f"{s}_labels"] for s in SIDES for p in pairs]
        width = max(len(r) for r in rows)
        batch = {
            "input_ids": torch.tensor([r + [self.pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels]),
        }
        if "ref_chosen" in pairs[0]:
            batch["ref_logps"] = torch.tensor(
                [p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs], dtype=torch.float64
            )
        return batch
