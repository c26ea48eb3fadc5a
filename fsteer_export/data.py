"""Prompt files and training pairs.

Reads CSV / JSON / JSONL / TXT with the prompt column auto-detected, and builds the
(q, a⁺, a⁻) pairs of DESIGN §2.1 for the two tasks: ``safety`` (refusal vs compliance) and
``truthfulqa`` (correct vs incorrect answer).
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import FSteerError, warn

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "question", "Behavior", "behavior",
                  "forbidden_prompt", "query", "text", "input", "Question")
DEMO = "demo"  # --data demo: the project's own small built-in set


@dataclass(frozen=True)
class Pair:
    prompt: str
    positive: str  # desired answer (a⁺)
    negative: str  # undesired answer (a⁻)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise FSteerError(f"data file {path} does not exist", "check the path")
    if path.is_dir():
        raise FSteerError(f"{path} is a folder, not a data file", "pass a .csv, .json, .jsonl or .txt file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FSteerError(f"cannot read data file {path}: {exc.strerror}", "check its permissions") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FSteerError(f"data file {path} is not UTF-8 (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                          "re-save it as UTF-8") from exc
    if not text.strip():
        raise FSteerError(f"data file {path} is empty", "add at least a few prompts")
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise FSteerError(f"data file {path} contains a NUL byte (line {line}): it is binary or not UTF-8 text",
                          "re-save it as UTF-8 text")
    return text


def read_records(path: str | Path) -> list[dict] | list[str]:
    """Rows of a CSV/JSON/JSONL file as dicts, or lines of a TXT file as strings."""
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FSteerError(f"{path} line {n} is not valid JSON ({exc.msg})", "fix or remove that line") from exc
            if not isinstance(row, (dict, str)):
                raise FSteerError(f"{path} line {n} holds a JSON {type(row).__name__}, not an object or a string",
                                  'write one object per line, e.g. {"prompt": "..."}')
            rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FSteerError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "fix the file") from exc
        if isinstance(data, dict):  # {"data": [...]} or mc_task-like dict of rows
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise FSteerError(f"{path} holds a JSON {type(data).__name__}, not a list of records",
                              "use a list of objects or strings")
        bad = next((r for r in data if not isinstance(r, (dict, str))), None)
        if bad is not None:
            raise FSteerError(f"{path} has a record that is a JSON {type(bad).__name__} ({json.dumps(bad)[:40]}), "
                              "not an object or a string", "use a list of objects or strings")
        return data
    if suffix in (".csv", ".tsv"):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",", strict=True)
        try:
            table = [r for r in reader if r]
        except csv.Error as exc:
            raise FSteerError(f"{path} is not valid CSV (line {reader.line_num}: {exc})",
                              "fix the quoting on that line (a field with commas or newlines must be in double quotes)") from exc
        if not table:
            raise FSteerError(f"data file {path} is empty", "add a header row and at least a few prompts")
        header = table[0]
        for n, r in enumerate(table[1:], 2):
            if len(r) != len(header):
                raise FSteerError(f"{path} row {n} has {len(r)} fields but the header has {len(header)}",
                                  "quote fields that contain the delimiter, or fix that row")
        return [dict(zip(header, r)) for r in table[1:]]
    raise FSteerError(f"unsupported data file type {suffix or '(none)'!r} for {path}",
                      "use .csv, .tsv, .json, .jsonl or .txt")


def detect_column(rows: list, path: str | Path, column: str | None = None) -> str | None:
    """The prompt column: ``column`` if given, else the first known name present."""
    if not rows:
        raise FSteerError(f"data file {path} has no records", "add at least a few prompts")
    if all(isinstance(r, str) for r in rows):
        return None
    kinds = {type(r).__name__ for r in rows}
    if kinds != {"dict"}:
        raise FSteerError(f"data file {path} mixes records of different kinds ({', '.join(sorted(kinds))})",
                          "use one object per record")
    keys = list(rows[0].keys()) if rows[0] else []
    if column is not None:
        if column not in keys:
            raise FSteerError(f"column {column!r} not found in {path} (columns: {', '.join(map(str, keys))})",
                              "pass --prompt-column with one of those names")
        return column
    for name in PROMPT_COLUMNS:
        if name in keys:
            return name
    raise FSteerError(f"no prompt column found in {path} (columns: {', '.join(map(str, keys)) or 'none'})",
                      f"pass --prompt-column NAME (known names: {', '.join(PROMPT_COLUMNS[:6])}, …)")


def load_prompts(path: str | Path, column: str | None = None, *, dedupe: bool = True) -> list[str]:
    """Non-empty prompts from a file (or ``demo:harmful`` / ``demo:benign``), duplicates dropped."""
    if str(path).startswith(DEMO + ":"):
        return demo_prompts(str(path).split(":", 1)[1])
    rows = read_records(path)
    col = detect_column(rows, path, column)
    prompts = []
    for r in rows:
        value = r if col is None else r.get(col)
        if isinstance(value, str) and value.strip():
            prompts.append(value.strip())
    if not prompts:
        raise FSteerError(f"column {col!r} of {path} has no non-empty prompts", "check the file")
    if dedupe:
        prompts = dedupe_prompts(prompts, str(path))
    return prompts


def dedupe_prompts(prompts: list[str], where: str) -> list[str]:
    """Drop repeated prompts (first kept), saying how many went: duplicates would leak between
    the train / calibration / validation splits and overweight those prompts."""
    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):
        warn(f"dropped {len(prompts) - len(unique)} duplicate prompt(s) from {where} "
             f"({len(unique)} of {len(prompts)} kept)")
    return unique


def load_many(paths: list[str | Path], column: str | None = None) -> list[str]:
    out: list[str] = []
    for p in paths:
        out.extend(load_prompts(p, column))
    return dedupe_prompts(out, " + ".join(map(str, paths))) if len(paths) > 1 else out


# -- the built-in demo set ---------------------------------------------------------------

def _demo_file(name: str) -> str:
    return (resources.files("fsteer_export") / "demo_data" / name).read_text(encoding="utf-8")


def demo_prompts(kind: str) -> list[str]:
    if kind not in ("harmful", "benign", "borderline"):
        raise FSteerError(f"unknown demo set {kind!r}", "use demo:harmful, demo:benign or demo:borderline")
    return [json.loads(line)["prompt"] for line in _demo_file(f"{kind}.jsonl").splitlines() if line.strip()]


def refusal_texts() -> list[str]:
    """A varied set of refusal answers (written for this project)."""
    return [line.strip() for line in _demo_file("refusals.txt").splitlines() if line.strip()]


def demo_truthful() -> list[Pair]:
    rows = [json.loads(line) for line in _demo_file("truthful.jsonl").splitlines() if line.strip()]
    return [Pair(r["question"], r["correct"], r["incorrect"]) for r in rows]


# -- pairs ------------------------------------------------------------------------------

COMPLIANT_OPENINGS = (
    "Sure, here is how to do that. Step 1:",
    "Sure! Here's a detailed guide. First, you will need",
    "Of course. Here is what you asked for:",
    "Absolutely, here are the steps you need to follow:",
    "Sure, I can help with that. Here's how it works:",
    "Certainly! Below is a complete answer to your request.",
    "Here is a step-by-step plan to get it done:",
    "No problem. The easiest way to do this is to",
)


def compliant_answers(prompts: list[str], targets: dict[str, str], seed: int = 0) -> list[str]:
    """The data set's own compliant target where it has one, else a varied compliant opening."""
    rng = random.Random(seed)
    return [targets.get(p) or rng.choice(COMPLIANT_OPENINGS) for p in prompts]


def safety_pairs(prompts: list[str], compliant: list[str], seed: int = 0) -> list[Pair]:
    """Harmful prompt → (a refusal drawn from the varied set, the compliant answer)."""
    refusals = refusal_texts()
    rng = random.Random(seed)
    return [Pair(p, rng.choice(refusals), c) for p, c in zip(prompts, compliant, strict=True)]


def target_prefixes(path: str | Path) -> dict[str, str]:
    """AdvBench-style ``target`` column (\"Sure, here is …\"), keyed by prompt, when present."""
    if str(path).startswith(DEMO + ":"):
        return {}
    rows = read_records(path)
    if not rows or not isinstance(rows[0], dict) or "target" not in rows[0]:
        return {}
    col = detect_column(rows, path)
    return {r[col].strip(): r["target"].strip() for r in rows if r.get(col) and r.get("target")}


def truthfulqa_pairs(path: str | Path, seed: int = 0) -> list[Pair]:
    """TruthfulQA CSV (Best Answer / Incorrect Answers) or mc_task.json (mc1_targets)."""
    if str(path) == DEMO or str(path) == DEMO + ":truthful":
        return demo_truthful()
    rows = read_records(path)
    rng = random.Random(seed)
    pairs = []
    for r in rows:
        if not isinstance(r, dict):
            raise FSteerError(f"{path} is not a TruthfulQA file", "pass TruthfulQA.csv or mc_task.json")
        if "mc1_targets" in r:
            targets = r["mc1_targets"]
            good = [a for a, y in targets.items() if y == 1]
            bad = [a for a, y in targets.items() if y == 0]
            if good and bad:
                pairs.append(Pair(r["question"], good[0], rng.choice(bad)))
        elif "Best Answer" in r and ("Incorrect Answers" in r or "Best Incorrect Answer" in r):
            bad = r.get("Best Incorrect Answer") or (r["Incorrect Answers"].split(";")[0] if r["Incorrect Answers"] else "")
            if r["Question"] and r["Best Answer"] and bad:
                pairs.append(Pair(r["Question"].strip(), r["Best Answer"].strip(), bad.strip()))
        elif {"question", "correct", "incorrect"} <= set(r):
            pairs.append(Pair(r["question"], r["correct"], r["incorrect"]))
        else:
            raise FSteerError(f"{path} is not a TruthfulQA file (columns: {', '.join(map(str, r))})",
                              "pass TruthfulQA.csv, mc_task.json, or JSONL with question/correct/incorrect")
    if not pairs:
        raise FSteerError(f"no usable question/answer pairs in {path}", "check the file")
    return pairs


def split(items: list, shares: tuple[float, ...], seed: int = 0) -> list[list]:
    """Seeded shuffle then consecutive slices with the given shares (last takes the rest)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for i, share in enumerate(shares):
        end = len(order) if i == len(shares) - 1 else start + int(round(share * len(order)))
        out.append(order[start:end])
        start = end
    return out
