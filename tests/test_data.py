"""floe.data: schemas, loss masks, templates, splits, mixtures, BIG-bench archive, errors, collation.

All offline: BIG-bench tests use a small fake archive with the real layout in tmp_path.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import random
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_model

import floe.data as D
from floe.data import bigbench, splits
from floe.data.tokenize import IGNORE_INDEX, INSTRUCTION_HEADER, RESPONSE_HEADER

# --- helpers -------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Add one to {i}.", "input": "" if i % 2 else f"The number is {i}.",
             "output": f"The answer is {i + 1}."} for i in range(n)]


def supervised(ids: list[int], labels: list[int]) -> list[int]:
    assert len(ids) == len(labels)
    for i, lab in zip(ids, labels):
        assert lab in (i, IGNORE_INDEX)  # a label is the token itself or ignored
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each stretch of supervised tokens."""
    out, start = [], None
    for k, lab in enumerate(labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = k
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, k))
            start = None
    return out


def tokenizer_with(template: str | None):
    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = template
    return tok


# --- schemas ------------------------------------------------------------------


def test_schema_detection_turns_alpaca_dolly_and_chat_rows_into_conversations(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Say hi.", "output": "Hi"}])
    dolly = tmp_path / "dolly.json"
    dolly.write_text(json.dumps([
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Name a colour.", "context": "", "response": "Blue"}]))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"}]}])

    got = {r.messages[-1]["content"]: r for r in D.load_records(str(alpaca), split="all")}
    assert got["Hello"].messages == [{"role": "user", "content": "Translate.\n\nBonjour"},
                                     {"role": "assistant", "content": "Hello"}]
    assert got["Hi"].messages[0] == {"role": "user", "content": "Say hi."}
    assert got["Hello"].meta["schema"] == "Alpaca" and got["Hello"].meta["task"] == "alpaca"

    got = {r.response: r for r in D.load_records(str(dolly), split="all")}
    assert got["Short."].messages[0]["content"] == "Summarise.\n\nA long text."
    assert got["Short."].meta["category"] == "summarization" and got["Short."].meta["schema"] == "Dolly"
    assert got["Blue"].messages[0]["content"] == "Name a colour."

    (rec,) = D.load_records(str(chat), split="all")
    assert rec.meta["schema"] == "chat" and len(rec.messages) == 5
    assert rec.response == "Goodbye" and rec.prompt_messages == rec.messages[:4]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "mislabelled.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(3)))
    assert len(D.load_records(str(path), split="all")) == 3


# --- loss masks -----------------------------------------------------------------


def test_chat_template_labels_are_ignored_exactly_on_prompt_tokens(tokenizer):
    rec = D.Record([{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Paris."}], {"where": "t"})
    out = D.tokenize_record(rec, tokenizer, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    prompt_text = tokenizer.apply_chat_template(rec.messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in labels[:len(prompt_ids)])
    assert all(lab != IGNORE_INDEX for lab in labels[len(prompt_ids):-1])
    assert tokenizer.decode(supervised(ids, labels)) == "Paris.<|im_end|>"
    assert tokenizer.decode(ids[-1:]) == "\n" and labels[-1] == IGNORE_INDEX  # after end-of-turn: masked
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(rec.messages, tokenize=False)


def test_multi_turn_chat_supervises_every_assistant_turn_and_nothing_else(tokenizer):
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "And the sentence?"}, {"role": "assistant", "content": "The capital is Paris."}]
    out = D.tokenize_record(D.Record(messages, {}), tokenizer, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    # reference by decoding: each supervised stretch is one assistant turn plus its end-of-turn token
    assert [tokenizer.decode(ids[a:b]) for a, b in runs(labels)] == ["Paris<|im_end|>", "The capital is Paris.<|im_end|>"]
    text = tokenizer.decode(ids)
    for a, b in runs(labels):  # and it sits right after an assistant header
        assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)


def test_template_with_default_system_prompt_and_trimmed_content_still_masks_the_prompt():
    # SmolLM2-style: a system turn is injected when none is given; content is trimmed.
    template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = tokenizer_with(template)
    rec = D.Record([{"role": "user", "content": "Name a city."}, {"role": "assistant", "content": "  Paris  "}], {})
    out = D.tokenize_record(rec, tok, max_length=512)
    assert tok.decode(supervised(out["input_ids"], out["labels"])) == "Paris<|im_end|>"
    assert tok.decode(out["input_ids"]).startswith("<|im_start|>system\nYou are helpful.")


def test_plain_fallback_format_when_the_tokenizer_has_no_chat_template():
    tok = tokenizer_with(None)
    rec = D.Record([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], {})
    out = D.tokenize_record(rec, tok, max_length=512)
    expected = f"{INSTRUCTION_HEADER}What is 2+2?\n\n{RESPONSE_HEADER}4{tok.eos_token}"
    assert tok.decode(out["input_ids"]) == expected
    assert tok.decode(supervised(out["input_ids"], out["labels"])) == "4" + tok.eos_token
    assert D.render_prompt(rec.prompt_messages, tok) == f"{INSTRUCTION_HEADER}What is 2+2?\n\n{RESPONSE_HEADER}"
    # the same record through template='plain' on a tokenizer that has a template
    same = D.tokenize_record(rec, make_tokenizer(), max_length=512, template="plain")
    assert same == out


def test_load_data_labels_decode_to_the_responses(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    ds = D.load_data(str(path), tokenizer, split="all")
    assert len(ds) == 12 and len(ds.examples) == 12
    for feat, rec in zip(ds, ds.examples):
        assert tokenizer.decode(supervised(feat["input_ids"], feat["labels"])) == rec.response + "<|im_end|>"


def test_template_that_is_not_prefix_stable_is_rejected():
    # renders the last assistant turn differently from earlier ones: no clean prompt/response boundary
    template = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    rec = D.Record([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], {"where": "ex 7"})
    with pytest.raises(D.DataError, match=r"ex 7.*template='plain'"):
        D.tokenize_record(rec, tokenizer_with(template), max_length=512)


# --- length -------------------------------------------------------------------


def test_too_long_example_raises_naming_it_or_is_skipped_with_a_warning(tmp_path, tokenizer, caplog):
    rows = alpaca_rows(6)
    rows[3] = {"instruction": "Repeat. " * 60, "output": "ok"}
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(D.DataError, match=r"long\.jsonl, line 4: \d+ tokens exceed max_length=64"):
        D.load_data(str(path), tokenizer, split="all", max_length=64)
    with caplog.at_level(logging.WARNING, logger="floe.data"):
        ds = D.load_data(str(path), tokenizer, split="all", max_length=64, on_error="skip")
    assert len(ds) == 5 and all(len(f["input_ids"]) <= 64 for f in ds)
    assert "skipped 1 examples" in caplog.text and "line 4" in caplog.text


def test_truncate_prompt_keeps_the_whole_response_and_never_yields_all_ignored_labels(tokenizer):
    long_prompt = D.Record([{"role": "user", "content": "Repeat. " * 60}, {"role": "assistant", "content": "ok then"}],
                           {"where": "p"})
    out = D.tokenize_record(long_prompt, tokenizer, max_length=32, truncate_prompt=True)
    assert len(out["input_ids"]) == 32
    assert tokenizer.decode(supervised(out["input_ids"], out["labels"])) == "ok then<|im_end|>"

    long_answer = D.Record([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris. " * 40}],
                           {"where": "answer 3"})
    for truncate in (False, True):  # the response itself cannot fit: error, never a label-less example
        with pytest.raises(D.DataError, match=r"answer 3: \d+ tokens exceed max_length=32"):
            D.tokenize_record(long_answer, tokenizer, max_length=32, truncate_prompt=truncate)
    ds = D.tokenize_records([long_prompt, long_answer], tokenizer, max_length=32, truncate_prompt=True,
                            on_error="skip")
    assert len(ds) == 1 and ds.examples == [long_prompt]
    for feat in ds:
        assert any(lab != IGNORE_INDEX for lab in feat["labels"])


# --- splits, caps, fraction -------------------------------------------------------


def test_splits_are_deterministic_disjoint_and_cover_the_data(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(50))
    get = lambda split, seed=42: [r.meta["where"] for r in D.load_records(str(path), split=split, seed=seed)]
    train, val, test = get("train"), get("validation"), get("test")
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert set(train) | set(val) | set(test) == set(get("all"))
    assert get("train") == train and get("test") == test  # same seed, same result
    assert set(get("test", seed=7)) != set(test)  # another seed holds out other examples
    fracs = dict(val_fraction=0.2, test_fraction=0.3)
    assert len(D.load_records(str(path), split="test", **fracs)) == 15
    assert len(D.load_records(str(path), split="val", **fracs)) == 10


def test_caps_never_move_held_out_examples_into_train(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(60))
    where = lambda recs: {r.meta["where"] for r in recs}
    full_test = where(D.load_records(str(path), split="test"))
    for cap in (3, 10, 100):
        train = where(D.load_records(str(path), split="train", max_per_task=cap))
        assert len(train) == min(cap, 48) and train.isdisjoint(full_test)
        assert where(D.load_records(str(path), split="test", max_examples=cap)) <= full_test
    small = where(D.load_records(str(path), max_examples=10))
    assert small <= where(D.load_records(str(path), max_examples=20))  # larger caps give supersets


def test_fraction_samples_a_seeded_subset_of_the_training_data(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(81))
    where = lambda **kw: [r.meta["where"] for r in D.load_records(str(path), **kw)]
    full = set(where())
    half = where(fraction=0.5)
    assert len(full) == 65 and len(half) == round(65 * 0.5)
    assert set(half) <= full and half == where(fraction=0.5)
    assert set(where(fraction=0.5, seed=1)) != set(half)
    with pytest.raises(ValueError, match="fraction"):
        D.load_records(str(path), fraction=0)


def test_equal_shares_are_max_min_fair_against_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        sizes = {f"t{i}": rng.randint(0, 12) for i in range(rng.randint(1, 4))}
        total = rng.randint(0, 40)
        got = splits.equal_shares(sizes, total)
        assert sum(got.values()) == min(total, sum(sizes.values()))
        assert all(0 <= got[t] <= sizes[t] for t in sizes)
        # brute force: the allocation's sorted share vector is the lexicographic max of its sorted minimums
        best = max(_allocations(list(sizes.values()), min(total, sum(sizes.values()))), key=sorted)
        assert sorted(got.values()) == sorted(best)


def _allocations(sizes: list[int], total: int):
    if not sizes:
        if total == 0:
            yield []
        return
    for k in range(min(sizes[0], total) + 1):
        for rest in _allocations(sizes[1:], total - k):
            yield [k] + rest


# --- BIG-bench from a fake archive -----------------------------------------------

NI_SIZES = {"subtask001_alpha_generation": 40, "subtask002_beta_answer": 60,
            "subtask003_gamma_typing": 12, "subtask004_delta_questions": 90}


def _ni_task(name: str, n: int) -> dict:
    return {"name": name, "task_prefix": f"Definition: do {name}. Prompt: answer.", "metrics": ["rouge"],
            "examples": [{"input": f"{name} question {i}", "target": [f"{name} answer {i}", f"alt {i}"]}
                         for i in range(n)]}


def _fake_tasks() -> dict[str, dict]:
    tasks = {f"natural_instructions/{k}": _ni_task(k, n) for k, n in NI_SIZES.items()}
    tasks["natural_instructions"] = {"name": "natural_instructions", "description": "61 tasks"}
    tasks["sports_understanding"] = {
        "name": "sports_understanding", "task_prefix": "Determine whether the statement is plausible:",
        "example_input_prefix": "\nStatement: ", "example_output_prefix": "\nPlausible/implausible? ",
        "append_choices_to_input": False, "preferred_score": "multiple_choice_grade",
        "examples": [{"input": f"Player {i} scored", "target_scores": {"plausible": i % 2, "implausible": 1 - i % 2}}
                     for i in range(30)] + [{"input": "Player 0 scored", "target_scores": {"plausible": 0, "implausible": 1}}]}
    tasks["date_understanding"] = {  # BIG-bench defaults: Q:/A: prefixes, choices appended
        "name": "date_understanding",
        "examples": [{"input": f"Yesterday was day {i}. What is today?",
                      "target_scores": {f"day {i + 1}": 1, f"day {i - 1}": 0, f"day {i + 7}": 0}} for i in range(20)]}
    tasks["arithmetic/1_digit_addition"] = {"name": "1_digit_addition",
                                            "examples": [{"input": f"{i} + 1 =", "target": str(i + 1)} for i in range(10)]}
    tasks["arithmetic"] = {"name": "arithmetic"}
    tasks["broken_task"] = {"name": "broken_task", "examples": [
        {"input": "fine", "target": "yes"}, {"input": "no target here"}, {"input": "empty", "target": [""]},
        {"input": "also fine", "target": "no"}]}
    return tasks


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    """A small archive with BIG-bench's layout; FLOE_CACHE and the fetch point at tmp_path."""
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    with tarfile.open(archive, "w:gz") as tar:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("README.md", b"benchmark tasks")
        for key, task in _fake_tasks().items():
            add(f"{key}/task.json", json.dumps(task).encode())
        add("program_task/task.py", b"# programmatic")
    monkeypatch.setenv("FLOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bigbench, "fetch_archive", lambda: archive)
    scans = []
    real_scan = bigbench.scan_archive
    monkeypatch.setattr(bigbench, "scan_archive", lambda a, wanted: scans.append(a) or real_scan(a, wanted))
    return scans


def test_natural_instructions_mixture_gives_each_subtask_an_equal_share(fake_bigbench):
    recs = D.load_records("bigbench:natural_instructions", max_examples=32, val_fraction=0.1, test_fraction=0.1)
    per_task = {}
    for r in recs:
        per_task[r.meta["task"]] = per_task.get(r.meta["task"], 0) + 1
    assert per_task == {f"natural_instructions/{k}": 8 for k in NI_SIZES}
    # a task too small for its share (subtask003 has 10 training examples) gives all it has
    recs = D.load_records("bigbench:natural_instructions", max_examples=60)
    counts = sorted((sum(r.meta["task"].endswith(k) for r in recs), k) for k in NI_SIZES)
    assert [c for c, _ in counts] == [10, 16, 17, 17]
    assert len({r.meta["task"] for r in recs[:8]}) > 1  # tasks are interleaved, not in blocks


def test_bigbench_examples_become_prompts_with_references_and_choices(fake_bigbench):
    recs = {r.meta["index"]: r for r in D.load_records("bigbench:subtask001_alpha_generation", split="all")}
    r = recs[3]
    assert r.messages[0]["content"] == ("Definition: do subtask001_alpha_generation. Prompt: answer.\n\n"
                                        "Q: subtask001_alpha_generation question 3\nA:")
    assert r.response == "subtask001_alpha_generation answer 3"
    assert r.meta["references"] == ["subtask001_alpha_generation answer 3", "alt 3"]
    assert r.meta["task"] == "natural_instructions/subtask001_alpha_generation" and r.meta["choices"] is None

    sports = D.load_records("bigbench:sports_understanding", split="all")
    assert len(sports) == 30  # the exact duplicate of example 0 is dropped, as BIG-bench does
    s = next(x for x in sports if x.meta["index"] == 3)
    assert s.messages[0]["content"] == ("Determine whether the statement is plausible:\n\n"
                                        "Statement: Player 3 scored\nPlausible/implausible?")
    assert s.response == "plausible" and s.meta["choices"] == ["plausible", "implausible"]
    assert s.meta["target_scores"] == [1.0, 0.0]

    d = next(x for x in D.load_records("bigbench:date_understanding", split="all") if x.meta["index"] == 5)
    prompt = d.messages[0]["content"]
    assert prompt.startswith("Q: Yesterday was day 5. What is today?\n  choice: ") and prompt.endswith("\nA:")
    assert sorted(line.removeprefix("  choice: ") for line in prompt.splitlines()[1:-1]) == ["day 12", "day 4", "day 6"]
    assert d.response == "day 6"


def test_bigbench_extracts_requested_tasks_once_and_caches_the_index(fake_bigbench, tmp_path):
    scans = fake_bigbench
    D.load_records("bigbench:natural_instructions", split="all")
    assert len(scans) == 1  # index built and members extracted in the same pass
    extracted = sorted(p.parent.name for p in (tmp_path / "cache").rglob("task.json"))
    assert extracted == sorted(["natural_instructions", *NI_SIZES])  # nothing else
    D.load_records("bigbench:natural_instructions", split="all")
    D.load_records("bigbench:subtask002_beta_answer", split="all")
    assert len(scans) == 1  # all cached
    D.load_records("bigbench:sports_understanding,date_understanding", split="all")
    assert len(scans) == 2  # one pass for both new tasks
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_subtask_alone_has_the_same_held_out_split_as_inside_the_mixture(fake_bigbench):
    alone = {r.meta["index"] for r in D.load_records("bigbench:natural_instructions/subtask004_delta_questions",
                                                     split="test")}
    mixed = {r.meta["index"] for r in D.load_records("bigbench:natural_instructions", split="test")
             if r.meta["task"].endswith("subtask004_delta_questions")}
    assert alone == mixed and len(alone) == 9


def test_bigbench_name_errors_are_actionable(fake_bigbench):
    with pytest.raises(D.DataError, match="Did you mean: sports_understanding"):
        D.load_records("bigbench:sports_understandin")
    with pytest.raises(D.DataError, match="programmatic"):
        D.load_records("bigbench:program_task")
    recs = D.load_records("bigbench:arithmetic", split="all")  # parent of subtasks -> its subtasks
    assert {r.meta["task"] for r in recs} == {"arithmetic/1_digit_addition"}


def test_bigbench_malformed_examples_name_task_and_index_and_empty_targets_are_skipped(fake_bigbench, caplog):
    with pytest.raises(D.DataError, match=r"bigbench task 'broken_task', example 1: field 'target' or 'target_scores'"):
        D.load_records("bigbench:broken_task", split="all")
    with caplog.at_level(logging.WARNING, logger="floe.data"):
        recs = D.load_records("bigbench:broken_task", split="all", on_error="skip")
    assert sorted(r.response for r in recs) == ["no", "yes"]
    assert "skipped 1 unusable examples" in caplog.text and "example 2: field 'target' is empty" in caplog.text
    assert "skipped 1 malformed examples" in caplog.text


def test_a_downloaded_archive_is_reused_without_running_pip(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("FLOE_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    archive = tmp_path / "downloads" / "bigbench-1.0.0.tar.gz"
    archive.write_bytes(b"x")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was run for a cached archive"))
    assert bigbench.fetch_archive() == archive


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("name, content, pattern", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
     r"bad\.jsonl, line 2: invalid JSON"),
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     r"bad\.json: invalid JSON at line 2 column"),
    ("missing.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
     r"missing\.jsonl, line 2: field 'output' missing; .*Alpaca \('instruction', 'output'"),
    ("missing.json", '[{"instruction": "a", "response": "b"}, {"response": "c"}]',
     r"missing\.json, item 1: field 'instruction' missing; .*Dolly"),
    ("types.jsonl", '{"instruction": "a", "output": 3}\n', r"types\.jsonl, line 1: field 'output' must be a string, got int"),
    ("types.json", '[{"instruction": ["a"], "response": "b"}]', r"types\.json, item 0: field 'instruction' must be a string"),
    ("role.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
     r"role\.jsonl, line 1: field 'messages\[1\]\.role' is 'bot'"),
    ("noassist.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n',
     r"noassist\.jsonl, line 1: field 'messages' has no assistant turn"),
    ("content.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}\n',
     r"content\.jsonl, line 1: field 'messages\[1\]\.content' is missing"),
    ("emptyout.jsonl", '{"instruction": "a", "output": "  "}\n', r"emptyout\.jsonl, line 1: field 'output' is empty"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl: the data set is empty"),
    ("empty.json", "[]", r"empty\.json: the data set is empty"),
    ("object.json", '{"data": []}', r"object\.json: expected a JSON list"),
    ("noschema.jsonl", '{"question": "a", "answer": "b"}\n', r"noschema\.jsonl: no row has the fields.*'answer', 'question'"),
])
def test_bad_input_errors_name_file_location_and_field(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(D.DataError, match=pattern):
        D.load_records(str(path), split="all")


def test_skip_drops_bad_lines_with_a_counted_warning(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in alpaca_rows(5)]
    lines[1] = "{not json"
    lines[3] = json.dumps({"instruction": "x", "output": 5})
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="floe.data"):
        recs = D.load_records(str(path), split="all", on_error="skip")
    assert len(recs) == 3
    assert "skipped 2 malformed examples" in caplog.text and "line 2" in caplog.text
    path.write_text("{bad\n{worse\n")
    with pytest.raises(D.DataError, match="no usable examples"):
        D.load_records(str(path), split="all", on_error="skip")


def test_missing_path_and_offline_hub_name_are_explained(tmp_path, monkeypatch):
    with pytest.raises(D.DataError, match="no such file or folder"):
        D.load_records(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D.DataError, match="HF_HUB_OFFLINE"):
        D.load_records("hf:tatsu-lab/alpaca")


# --- folders and Hugging Face data sets ------------------------------------------------


def test_saved_hugging_face_dataset_folder_is_detected_and_split(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    train = D.load_records(str(tmp_path / "saved"))
    test = D.load_records(str(tmp_path / "saved"), split="test")
    assert len(train) == 16 and len(test) == 2 and train[0].meta["schema"] == "chat"
    assert {r.response for r in train}.isdisjoint(r.response for r in test)


def test_folder_with_split_files_uses_them_and_carves_validation_from_train(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", alpaca_rows(30))
    write_jsonl(folder / "test.jsonl", [{"instruction": f"held {i}", "output": "x"} for i in range(4)])
    test = D.load_records(str(folder), split="test")
    val = D.load_records(str(folder), split="validation")
    train = D.load_records(str(folder), split="train")
    assert sorted(r.messages[0]["content"] for r in test) == [f"held {i}" for i in range(4)]
    assert len(val) == 3 and len(train) == 27
    assert {r.meta["where"] for r in val}.isdisjoint(r.meta["where"] for r in train)


# --- collation ------------------------------------------------------------------------------


def test_collator_right_pads_ids_labels_and_mask():
    tok = make_tokenizer()
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = D.DataCollator(tok)(feats)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert D.DataCollator(tok, pad_to_multiple_of=4)(feats)["input_ids"].shape == (2, 4)
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert D.DataCollator(no_pad)(feats)["input_ids"][1, 1].item() == tok.eos_token_id
    left = D.DataCollator(tok, padding_side="left")(feats)  # for generation: the last column is the last token
    assert left["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_longest_first_batches_cover_every_feature_once_with_their_indices():
    from floe.data.collate import longest_first

    feats = [{"input_ids": list(range(1, n + 1))} for n in (2, 5, 3, 5, 1)]
    got = list(longest_first(feats, 2, D.DataCollator(make_tokenizer())))
    assert [idx for idx, _ in got] == [[1, 3], [2, 0], [4]]  # longest first, ties in input order
    for idx, batch in got:
        assert batch["input_ids"].shape == (len(idx), len(feats[idx[0]]["input_ids"]))
        assert batch["attention_mask"].sum(1).tolist() == [len(feats[i]["input_ids"]) for i in idx]


def test_iter_batches_covers_every_example_once_and_shuffles_by_seed(tmp_path, tokenizer):
    ds = D.load_data(str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(11))), tokenizer, split="all")
    collate = D.DataCollator(tokenizer)
    firsts = lambda **kw: [b["input_ids"][:, :20].tolist() for b in D.iter_batches(ds, 4, collate, **kw)]
    batches = list(D.iter_batches(ds, 4, collate))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 3]
    assert firsts(shuffle=True, seed=3) == firsts(shuffle=True, seed=3) != firsts(shuffle=True, seed=4)
    assert len(list(D.iter_batches(ds, 4, collate, drop_last=True))) == 2


def test_a_collated_batch_trains_a_causal_lm_only_on_responses(tmp_path, tokenizer):
    ds = D.load_data(str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))), tokenizer, split="all")
    batch = D.DataCollator(tokenizer)([ds[i] for i in range(4)])
    model = tiny_model("llama")
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # reference: mean next-token cross-entropy over positions whose label is a response token
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep])
    assert torch.allclose(loss, ref, atol=1e-5)
