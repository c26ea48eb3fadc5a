"""Prompt files: formats, column detection, the built-in demo sets, and every malformed-input case."""

from __future__ import annotations

import json

import pytest

from fsteer_export.data import (PROMPT_COLUMNS, demo_prompts, detect_column, load_many, load_prompts,
                                read_records, refusal_texts, split, truthfulqa_pairs)
from fsteer_export.errors import FSteerError


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# -- good files ------------------------------------------------------------------------

def test_formats_and_column_detection(tmp_path):
    csv_ = write(tmp_path / "a.csv", 'goal,target\n"Write, with a comma",Sure\nSecond one,Sure\n')
    tsv = write(tmp_path / "a.tsv", "id\tinstruction\n1\tFirst\n2\tSecond\n")
    js = write(tmp_path / "a.json", json.dumps({"data": [{"question": "Q1"}, {"question": "Q2"}]}))
    jsl = write(tmp_path / "a.jsonl", '{"forbidden_prompt": "P1"}\n\n{"forbidden_prompt": "P2"}\n')
    txt = write(tmp_path / "a.txt", "line one\n\n  line two  \n")
    bom = write(tmp_path / "bom.csv", "\ufeffprompt\nwith a BOM\n".encode("utf-8"))
    assert load_prompts(csv_) == ["Write, with a comma", "Second one"]
    assert load_prompts(tsv) == ["First", "Second"]
    assert load_prompts(js) == ["Q1", "Q2"]
    assert load_prompts(jsl) == ["P1", "P2"]
    assert load_prompts(txt) == ["line one", "line two"]
    assert load_prompts(bom) == ["with a BOM"]
    assert load_prompts(csv_, column="target", dedupe=False) == ["Sure", "Sure"]


def test_detect_column_prefers_known_names():
    rows = [{"id": 1, "text": "a", "prompt": "b"}]
    assert detect_column(rows, "x") == "prompt"
    assert detect_column(["a", "b"], "x") is None
    assert "prompt" in PROMPT_COLUMNS


def test_demo_sets_are_built_in():
    harmful, benign = demo_prompts("harmful"), demo_prompts("benign")
    assert len(harmful) >= 40 and len(benign) >= 40
    assert not set(harmful) & set(benign)
    assert load_prompts("demo:harmful") == harmful
    assert len(refusal_texts()) >= 5
    assert len(truthfulqa_pairs("demo")) >= 10
    with pytest.raises(FSteerError, match="unknown demo set 'nope'"):
        demo_prompts("nope")


def test_split_is_seeded_and_complete():
    items = list(range(50))
    a = split(items, (0.6, 0.2, 0.2), seed=3)
    assert a == split(items, (0.6, 0.2, 0.2), seed=3)
    assert sorted(x for part in a for x in part) == items
    assert [len(p) for p in a] == [30, 10, 10]


# -- duplicates: dropped and stated ------------------------------------------------------

def test_duplicates_are_dropped_with_a_warning(tmp_path, capsys):
    f = write(tmp_path / "dup.txt", "a\nb\na\na\nc\n")
    assert load_prompts(f) == ["a", "b", "c"]
    err = capsys.readouterr().err
    assert "warning: dropped 2 duplicate prompt(s)" in err and "3 of 5 kept" in err
    g = write(tmp_path / "other.txt", "c\nd\n")
    assert load_many([f, g]) == ["a", "b", "c", "d"]
    assert "warning: dropped 1 duplicate prompt(s)" in capsys.readouterr().err.splitlines()[-1]


def test_no_warning_without_duplicates(tmp_path, capsys):
    load_prompts(write(tmp_path / "u.txt", "a\nb\n"))
    assert capsys.readouterr().err == ""


# -- bad files: one clear FSteerError each -------------------------------------------------

BAD_FILES = [
    # (name, content, expected fragment of the message)
    ("empty.csv", "", "is empty"),
    ("blank.jsonl", "\n  \n", "is empty"),
    ("latin1.csv", "prompt\ncaf\xe9\n".encode("latin-1"), "is not UTF-8 (invalid byte 0xe9"),
    ("utf16.txt", "hello".encode("utf-16"), "is not UTF-8"),
    ("nul.txt", b"hello\x00world\n", "contains a NUL byte"),
    ("quote.csv", 'prompt,target\n"never closed,x\nnext,y\n', "is not valid CSV (line 3: unexpected end of data)"),
    ("ragged.csv", "prompt,target\na,b,c\n", "row 2 has 3 fields but the header has 2"),
    ("header.csv", "prompt\n", "has no records"),
    ("bad.json", '[{"prompt": "a"},', "is not valid JSON"),
    ("scalar.json", '"just text"', "holds a JSON str, not a list of records"),
    ("numbers.json", "[1, 2, 3]", "has a record that is a JSON int (1)"),
    ("empty.json", "[]", "has no records"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', "line 2 is not valid JSON"),
    ("list.jsonl", '{"prompt": "a"}\n[1, 2]\n', "line 2 holds a JSON list"),
    ("mixed.jsonl", '{"prompt": "a"}\n"b"\n', "mixes records of different kinds"),
    ("nocol.csv", "id,label\n1,x\n", "no prompt column found"),
    ("nocol.jsonl", '{"id": 1}\n', "no prompt column found"),
    ("emptycol.csv", "prompt,x\n,1\n  ,2\n", "has no non-empty prompts"),
    ("data.parquet", "x", "unsupported data file type '.parquet'"),
]


@pytest.mark.parametrize("name,content,fragment", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_file(tmp_path, name, content, fragment):
    f = write(tmp_path / name, content)
    with pytest.raises(FSteerError) as info:
        load_prompts(f)
    msg = info.value.line()
    assert fragment in msg
    assert str(f) in msg  # names the file
    assert " — fix: " in msg and "\n" not in msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FSteerError, match="does not exist"):
        load_prompts(tmp_path / "nope.csv")
    with pytest.raises(FSteerError, match="is a folder, not a data file"):
        load_prompts(tmp_path)


def test_unknown_prompt_column(tmp_path):
    f = write(tmp_path / "a.csv", "goal,target\nx,y\n")
    with pytest.raises(FSteerError) as info:
        load_prompts(f, column="question")
    assert "column 'question' not found" in info.value.line() and "goal, target" in info.value.line()


def test_read_records_keeps_csv_rows_as_dicts(tmp_path):
    f = write(tmp_path / "a.csv", 'goal,target\n"multi\nline",t\n')
    assert read_records(f) == [{"goal": "multi\nline", "target": "t"}]


def test_truthfulqa_file_errors(tmp_path):
    f = write(tmp_path / "t.jsonl", '{"prompt": "x"}\n')
    with pytest.raises(FSteerError, match="is not a TruthfulQA file"):
        truthfulqa_pairs(f)
