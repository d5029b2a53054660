"""floe.evaluation: metrics against hand-worked values, and every model-side computation against a
naive one-example-at-a-time reference (loss, option log-likelihoods, greedy decoding)."""
from __future__ import annotations

import json
import math
import sys

import peft  # noqa: F401  (before floe.adapters: importing its config first trips a circular import in peft_hook)
import pytest
import torch
from conftest import make_tokenizer, tiny_model
from train_helpers import save_tiny_model_folder, write_alpaca_jsonl

from floe.adapters.moe_lora import MoELoraConfig, adapters_disabled, apply_moe_lora, save_adapter
from floe.data import IGNORE_INDEX, Record, load_records, tokenize_records
from floe.evaluation import EvalConfig, EvalInputError, MissingDependencyError, evaluate
from floe.evaluation.choice import evaluate_choice, option_features
from floe.evaluation.generation import greedy_generate
from floe.evaluation.loss import evaluate_loss
from floe.evaluation.metrics import chance_level, exact_match, macro_average, normalize, rouge_l
from floe.evaluation.prompts import draw_shots, prompt_ids, prompt_messages, shot_pools

# --- metrics: hand-worked --------------------------------------------------------------------------


def test_exact_match_normalises_only_whitespace():
    assert normalize("  New \t York\n\n city ") == "New York city"
    assert exact_match("  Paris \n", "Paris") == 1.0
    assert exact_match("New   York", ["Boston", "New York"]) == 1.0  # any reference
    assert exact_match("paris", "Paris") == 0.0  # case kept
    assert exact_match("Paris.", "Paris") == 0.0  # punctuation kept
    assert exact_match("", ["x"]) == 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    """Textbook dynamic-programming LCS length (independent of rouge_score)."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def _f(lcs: int, n_pred: int, n_ref: int) -> float:
    p, r = lcs / n_pred, lcs / n_ref
    return 0.0 if lcs == 0 else 2 * p * r / (p + r)


@pytest.mark.parametrize("pred, ref, lcs, expected", [
    # the cat sat on the mat / the cat lay on a mat: LCS "the cat on mat" = 4 of 6 and 6 -> P = R = F = 2/3
    ("the cat sat on the mat", "the cat lay on a mat", 4, 2 / 3),
    # a b c d / b d: LCS 2, P = 2/4, R = 2/2, F = 2 * .5 * 1 / 1.5 = 2/3
    ("a b c d", "b d", 2, 2 / 3),
    # police killed the gunman / the gunman was shot by police: LCS "the gunman" = 2, P = 1/2, R = 1/3, F = 0.4
    ("police killed the gunman", "the gunman was shot by police", 2, 0.4),
    # case is folded, punctuation is not a token: "Paris." vs "paris" -> 1
    ("Paris.", "paris", 1, 1.0),
    ("Париж", "Париж", 1, 1.0),  # non-ASCII words count (rouge-score's default tokenizer would give 0)
    ("completely different", "nothing shared", 0, 0.0),
])
def test_rouge_l_matches_hand_worked_lcs(pred, ref, lcs, expected):
    toks = lambda s: [w.strip(".").lower() for w in s.split()]  # noqa: E731
    assert _lcs(toks(pred), toks(ref)) == lcs
    assert _f(lcs, len(toks(pred)), len(toks(ref))) == pytest.approx(expected)
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("the cat sat", ["dog", "the cat sat"]) == pytest.approx(1.0)
    assert rouge_l("the cat sat", ["the dog", "dog"]) == pytest.approx(_f(1, 3, 2))


def test_chance_level_and_macro_average():
    # one correct of 4; two correct (tied best) of 3; one of 5
    assert chance_level([[1, 0, 0, 0], [1, 1, 0], [0, 0, 1, 0, 0]]) == pytest.approx((1 / 4 + 2 / 3 + 1 / 5) / 3)
    assert chance_level([[0.0, 1.0]]) == 0.5
    assert macro_average({"a": 1.0, "b": 0.0, "c": 0.5}) == pytest.approx(0.5)
    assert macro_average({"a": 1.0, "b": float("nan")}) == 1.0


# --- model-side computations against naive references --------------------------------------------


def _records(n: int = 6, choices: bool = True) -> list[Record]:
    qa = [("What is the capital of France?", "Paris"), ("Translate the sentence into French.", "Bonjour"),
          ("Answer the question with one word.", "yes"), ("What colour is the sky?", "blue")]
    out = []
    for i in range(n):
        q, a = qa[i % len(qa)]
        meta = {"task": f"task{i % 2}", "where": f"example {i}", "references": [a]}
        if choices:
            opts = ["Paris", "Rome", "The capital of France is Paris.", "no"][: 2 + i % 3]
            scores = [0.0] * len(opts)
            scores[i % len(opts)] = 1.0
            meta.update(choices=opts, target_scores=scores)
        out.append(Record([{"role": "user", "content": q + " " * i}, {"role": "assistant", "content": a}], meta))
    return out


@torch.no_grad()
def _naive_logprob(model, ids: list[int], labels: list[int]) -> float:
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)


def test_loss_equals_a_naive_per_example_loop(arch):
    model, tok = tiny_model(arch), make_tokenizer()
    ds = tokenize_records(_records(7, choices=False), tok, max_length=128)
    got = evaluate_loss(model, tok, ds, batch_size=3)  # mixed lengths -> right padding inside batches
    total, count, per_task = 0.0, 0, {}
    for feat, rec in zip(ds.features, ds.examples):
        ids, labels = feat["input_ids"], feat["labels"]
        with torch.no_grad():  # HF's own causal LM loss (mean over the example's response tokens)
            out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(lab != IGNORE_INDEX for lab in labels[1:])
        total += float(out.loss) * n
        count += n
        s = per_task.setdefault(rec.meta["task"], [0.0, 0])
        s[0] += float(out.loss) * n
        s[1] += n
    assert got["tokens"] == count and got["examples"] == 7
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    for task, (s, n) in per_task.items():
        assert got["per_task"][task]["loss"] == pytest.approx(s / n, rel=1e-5)
    assert got["macro_loss"] == pytest.approx(sum(s / n for s, n in per_task.values()) / len(per_task), rel=1e-5)


def test_choice_scores_equal_a_naive_per_option_loop():
    model, tok = tiny_model("qwen2", seed=3), make_tokenizer()
    recs = _records(6)
    got = evaluate_choice(model, tok, recs, batch_size=4)
    correct = []
    for rec, pred in zip(recs, got["predictions"]):
        ids = prompt_ids(prompt_messages(rec), tok)
        naive = []
        for opt in rec.meta["choices"]:
            o = tok(opt, add_special_tokens=False)["input_ids"]
            naive.append(_naive_logprob(model, ids + o, [IGNORE_INDEX] * len(ids) + o))
        assert pred["logprobs"] == pytest.approx(naive, rel=1e-4, abs=1e-4)
        best = max(range(len(naive)), key=lambda i: naive[i])
        assert pred["prediction"] == rec.meta["choices"][best]
        correct.append(rec.meta["target_scores"][best] == 1.0)
    assert got["micro_accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert got["micro_chance"] == pytest.approx(sum(1 / len(r.meta["choices"]) for r in recs) / len(recs))


def test_choice_on_a_constructed_model_picks_the_most_likely_option():
    """With a zero output layer every next-token distribution is uniform over the 320 tokens, so an
    option of n tokens has log-likelihood exactly -n log 320 and the shortest option must win."""
    model, tok = tiny_model("llama"), make_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    options = ["The capital of France is Paris.", "Paris", "Answer the question with one word."]
    lengths = [len(tok(o, add_special_tokens=False)["input_ids"]) for o in options]
    assert len(set(lengths)) == 3
    short = lengths.index(min(lengths))
    rec = Record([{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
                 {"task": "t", "where": "x", "references": ["Paris"], "choices": options, "target_scores": [0, 1, 0]})
    got = evaluate_choice(model, tok, [rec], batch_size=2)
    pred = got["predictions"][0]
    assert pred["logprobs"] == pytest.approx([-n * math.log(320) for n in lengths], rel=1e-5)
    assert pred["prediction"] == options[short]
    assert got["accuracy"] == float(options[short] == "Paris")
    assert got["chance"] == pytest.approx(1 / 3)


def test_option_prompt_is_cut_from_the_left_to_fit():
    tok = make_tokenizer()
    feats, truncated = option_features(list(range(10, 40)), ["Paris", "Rome"], tok, max_length=20)
    assert truncated
    for f in feats:
        assert len(f["input_ids"]) <= 20 and f["input_ids"][-1] == f["labels"][-1]
        assert f["input_ids"][0] != 10  # the left end went


@torch.no_grad()
def _naive_greedy(model, ids: list[int], max_new: int, stops: list[int]) -> list[int]:
    """One prompt, no padding, no KV cache: argmax of a full forward pass per new token."""
    seq, out = list(ids), []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def test_batched_left_padded_greedy_equals_one_at_a_time(arch):
    model, tok = tiny_model(arch, seed=1), make_tokenizer()
    prompts = [prompt_ids(prompt_messages(r), tok) for r in _records(5, choices=False)]
    prompts[1] = prompts[1][:7]  # very different lengths -> heavy left padding
    assert len({len(p) for p in prompts}) > 2
    # stop on a token the random model actually emits, so stopping is exercised too
    first = _naive_greedy(model, prompts[0], 6, [])
    stops = [tok.eos_token_id, first[3]]
    got = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3, stop_ids=stops)
    want = [_naive_greedy(model, p, 6, stops) for p in prompts]
    assert got == want
    if first[3] not in first[:3]:
        assert len(got[0]) == 3  # stopped at the stop token


def test_adapters_disabled_evaluates_as_the_base_model():
    tok = make_tokenizer()
    base = tiny_model("llama", seed=2)
    adapted = tiny_model("llama", seed=2)
    adapted = apply_moe_lora(adapted, MoELoraConfig(r=4, num_experts=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    cfg = EvalConfig(metrics="loss,generate,choice", max_new_tokens=4, batch_size=3, progress=False)
    recs = _records(6)
    want = evaluate(base, tok, recs, cfg)
    with adapters_disabled(adapted):
        off = evaluate(adapted, tok, recs, cfg)
    on = evaluate(adapted, tok, recs, cfg)

    def numbers(r):
        return (r["loss"]["loss"], [p["prediction"] for p in r["generate"]["predictions"]],
                [p["logprobs"] for p in r["choice"]["predictions"]])

    w, o, a = numbers(want), numbers(off), numbers(on)
    assert o[0] == pytest.approx(w[0], rel=1e-6) and o[1] == w[1]
    for x, y in zip(o[2], w[2]):
        assert x == pytest.approx(y, rel=1e-6)
    assert a[0] != pytest.approx(w[0], rel=1e-4)  # the adapter does change the model (by far more than 1e-6)


# --- prompts, the API and the command line --------------------------------------------------------


def test_k_shot_prompts_use_solved_examples_of_the_same_task():
    pool = _records(8, choices=False)
    query = Record([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Spain?"},
                    {"role": "assistant", "content": "Madrid"}], {"task": "task1", "where": "q"})
    shots = draw_shots(query, shot_pools(pool), 2, seed=0)
    assert len(shots) == 2 and all(s.meta["task"] == "task1" for s in shots)
    assert shots == draw_shots(query, shot_pools(pool), 2, seed=0)  # deterministic
    msgs = prompt_messages(query, shots)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == shots[0].response and msgs[-1]["content"] == "Capital of Spain?"
    assert len(draw_shots(query, shot_pools(pool), 99, seed=0)) == 4  # no more than the task has
    zero = evaluate_choice(tiny_model(), make_tokenizer(), _records(4), batch_size=4)
    few = evaluate_choice(tiny_model(), make_tokenizer(), _records(4), batch_size=4, num_shots=1,
                          shots=shot_pools(_records(8)))
    assert few["num_shots"] == 1 and few["predictions"][0]["logprobs"] != zero["predictions"][0]["logprobs"]


def test_bad_settings_are_input_errors():
    model, tok = tiny_model(), make_tokenizer()
    with pytest.raises(EvalInputError, match="unknown 'bleu'"):
        evaluate(model, tok, _records(2), EvalConfig(metrics="loss,bleu"))
    with pytest.raises(EvalInputError, match="needs multiple-choice examples.*drop choice"):
        evaluate(model, tok, _records(2, choices=False), EvalConfig(metrics="choice", progress=False))
    with pytest.raises(EvalInputError, match="num_shots=2 needs demonstration records"):
        evaluate(model, tok, _records(2), EvalConfig(metrics="generate", num_shots=2, progress=False))
    with pytest.raises(EvalInputError, match="batch_size must be at least 1"):
        evaluate(model, tok, _records(2), EvalConfig(batch_size=0))
    assert EvalConfig().metric_list(_records(2)) == ["loss", "generate", "choice"]
    assert EvalConfig().metric_list(_records(2, choices=False)) == ["loss", "generate"]


def test_harness_bridge_names_the_install_command_when_missing(monkeypatch):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install lm-eval"):
        evaluate(tiny_model(), make_tokenizer(), _records(2),
                 EvalConfig(metrics="loss", harness_tasks=["hellaswag"], progress=False))


def test_floe_eval_command_writes_eval_json_and_matches_the_api(tmp_path, capsys):
    from floe.cli import build_parser
    from floe.evaluation.cli import add_eval_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if "eval" not in sub.choices:  # registered in floe.cli; tolerate a build without it
        add_eval_parser(sub)
    model_dir = save_tiny_model_folder(tmp_path / "tiny")
    data = write_alpaca_jsonl(tmp_path / "d.jsonl", 30)
    base_argv = ["eval", "--model", str(model_dir), "--data", str(data), "--split", "test",
                 "--metrics", "loss,generate", "--max-new-tokens", "3", "--no-progress"]

    def run(argv):  # through floe.cli.main: the one error handler every command shares
        from floe.cli import main

        return main(argv)

    assert run(base_argv + ["--output", str(tmp_path / "base")]) == 0
    base = json.loads((tmp_path / "base" / "eval.json").read_text())
    assert "[floe] loss" in capsys.readouterr().out
    model, tok = tiny_model("llama"), make_tokenizer()
    api = evaluate(model, tok, str(data), EvalConfig(metrics="loss,generate", max_new_tokens=3, progress=False))
    assert base["loss"]["loss"] == pytest.approx(api["loss"]["loss"], rel=1e-6)
    assert base["examples"] == api["examples"] == 3  # 10 % of 30
    assert [p["prediction"] for p in base["generate"]["predictions"]] == \
        [p["prediction"] for p in api["generate"]["predictions"]]
    assert base["job"]["data"]["on_error"] == "skip" and base["job"]["data"]["truncate_prompt"] is True

    # with an adapter (non-zero B): a different model
    adapted = tiny_model("llama")
    adapted = apply_moe_lora(adapted, MoELoraConfig(r=2, num_experts=2, target_modules=["down_proj"]))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(adapted, tmp_path / "adapter")
    assert run(base_argv + ["--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "ad")]) == 0
    ad = json.loads((tmp_path / "ad" / "eval.json").read_text())
    assert ad["loss"]["loss"] != pytest.approx(base["loss"]["loss"], rel=1e-4)

    # user errors: exit 2, one line, nothing written
    assert run(base_argv + ["--adapter", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "floe eval: error: --adapter" in err and "no such folder" in err
    assert run(base_argv[:-3] + ["--metrics", "choice", "--output", str(tmp_path / "y")]) == 2
    assert "needs multiple-choice examples" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / "eval.json").exists()


def test_evaluate_loads_a_source_split_as_training_does(tmp_path):
    data = write_alpaca_jsonl(tmp_path / "d.jsonl", 30)
    records = load_records(str(data), split="test")
    model, tok = tiny_model(), make_tokenizer()
    r = evaluate(model, tok, str(data), EvalConfig(metrics="loss", progress=False))
    assert r["examples"] == len(records) and r["split"] == "test"
    ds = tokenize_records(records, tok, max_length=512)
    assert r["loss"]["loss"] == pytest.approx(evaluate_loss(model, tok, ds)["loss"], rel=1e-6)


def test_print_config_shows_the_eval_data_defaults(capsys):
    import argparse

    from floe.evaluation.cli import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--print-config"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "  on_error: skip  #" in out and "  truncate_prompt: true  #" in out
    assert "  max_new_tokens: 64  #" in out and "harness_tasks: []" in out


def test_choice_with_the_prompt_run_once_scores_as_the_full_sequences(arch):
    """share_prompt (one prompt pass, options continued from its key/value cache) against every
    prompt + option scored in full: the same log-likelihoods, hence the same picks."""
    model, tok = tiny_model(arch, seed=4), make_tokenizer()
    recs = _records(6)
    shared = evaluate_choice(model, tok, recs, batch_size=4, share_prompt=True)
    full = evaluate_choice(model, tok, recs, batch_size=4, share_prompt=False)
    for a, b in zip(shared["predictions"], full["predictions"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], rel=1e-4, abs=1e-4)
        assert a["prediction"] == b["prediction"]
    assert shared["accuracy"] == full["accuracy"]
