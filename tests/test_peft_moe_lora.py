"""MoE-LoRA through PEFT itself: ``peft.get_peft_model(model, floe.MoELoraConfig(...))`` and
everything PEFT gives a LoRA user (save_pretrained / from_pretrained in a fresh process, disabling,
named adapters, merging, trainable-parameter report), the clear failure without FLoE, and the
conversion of FLoE's old adapter folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from conftest import make_tokenizer, tiny_model
from safetensors.torch import save_file

import floe
from floe.adapters.moe_lora import AdapterError, MoELoraConfig, MoELoraLinear, load_adapter, moe_lora_modules
from floe.cli import main

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
       "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def train_a_little(model: nn.Module, steps: int = 3) -> None:
    """A few AdamW steps on a toy LM loss, so that every B (and router) is non-zero."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for i in range(steps):
        x = ids(seed=10 + i)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_get_peft_model_wraps_exactly_the_named_modules_and_trains_exactly_the_adapter(arch, capsys):
    model = tiny_model(arch)
    cfg = MoELoraConfig(r=4, num_experts=3, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2])
    pm = peft.get_peft_model(model, cfg)
    assert isinstance(pm, peft.PeftModel)
    wrapped = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, MoELoraLinear)}
    assert sorted(wrapped) == sorted(f"model.layers.{i}.{t}" for i in (0, 2)
                                     for t in ("self_attn.q_proj", "mlp.down_proj"))
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) and not isinstance(m, MoELoraLinear)
                   for m in pm.modules()), "every targeted linear is a MoE-LoRA layer"
    # by hand, per module: r·d_in (A) + M·d_out·r (experts B) + M·d_in (router)
    expected = sum(4 * m.in_features + 3 * m.out_features * 4 + 3 * m.in_features for m in wrapped.values())
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(any(f".{part}.default." in n for part in ("lora_A", "lora_B", "lora_router")) for n in trainable)
    pm.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_disable_adapter_gives_the_base_logits():
    model = tiny_model("llama")
    x = ids()
    base = logits(model, x)
    pm = peft.get_peft_model(model, MoELoraConfig(r=4, num_experts=2, init_lora_weights=False))
    adapted = logits(pm, x)
    assert not torch.allclose(adapted, base)
    with pm.disable_adapter():
        assert torch.equal(logits(pm, x), base)
    assert torch.equal(logits(pm, x), adapted)


def test_two_named_adapters_switch_with_set_adapter(tmp_path):
    torch.manual_seed(1)
    model = tiny_model("qwen2")
    x = ids()
    pm = peft.get_peft_model(model, MoELoraConfig(r=4, num_experts=2, init_lora_weights=False), adapter_name="one")
    pm.add_adapter("two", MoELoraConfig(r=2, num_experts=3, layers_to_transform=[1], init_lora_weights=False))
    one = logits(pm, x)
    pm.set_adapter("two")
    two = logits(pm, x)
    assert not torch.allclose(one, two)
    assert {v.adapter for v in moe_lora_modules(pm).values()} == {"two"} and len(moe_lora_modules(pm)) == 3
    pm.save_pretrained(str(tmp_path / "both"), selected_adapters=["one", "two"])
    pm.set_adapter("one")
    assert torch.equal(logits(pm, x), one)
    # each adapter alone, loaded by name from the folder PEFT wrote, gives the same logits
    fresh = peft.PeftModel.from_pretrained(tiny_model("qwen2"), str(tmp_path / "both" / "two"), adapter_name="two")
    assert torch.equal(logits(fresh, x), two)


def test_merge_and_unload_at_one_expert_equals_the_unmerged_model_and_refuses_a_router():
    model = tiny_model("gemma")
    x = ids()
    pm = peft.get_peft_model(model, MoELoraConfig(r=4, num_experts=1, init_lora_weights=False))
    unmerged = logits(pm, x)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, MoELoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), unmerged, atol=1e-5, rtol=1e-5)

    routed = peft.get_peft_model(tiny_model("gemma"), MoELoraConfig(r=4, num_experts=3))
    with pytest.raises(ValueError, match="3 experts and a router.*cannot be merged.*num_experts = 1"):
        routed.merge_and_unload()


def _script(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_trained_adapter_reloads_with_peft_in_a_fresh_process_and_never_without_floe(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, MoELoraConfig(r=4, num_experts=3, layers_to_transform=[1, 3]))
    train_a_little(pm)
    x = ids()
    torch.save({"ids": x, "logits": logits(pm, x)}, tmp_path / "expected.pt")
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "FLOE_MOE_LORA"

    with_floe = _script("""
        import torch, floe, peft, transformers
        base = transformers.AutoModelForCausalLM.from_pretrained("base")
        pm = peft.PeftModel.from_pretrained(base, "adapter")
        assert type(pm.peft_config["default"]).__name__ == "MoELoraConfig"
        e = torch.load("expected.pt")
        with torch.no_grad():
            assert torch.equal(pm(input_ids=e["ids"]).logits, e["logits"]), "logits differ"
        print("identical")
    """, tmp_path)
    assert with_floe.returncode == 0 and "identical" in with_floe.stdout, with_floe.stderr[-3000:]

    without_floe = _script("""
        import sys, peft, transformers
        base = transformers.AutoModelForCausalLM.from_pretrained("base")
        try:
            peft.PeftModel.from_pretrained(base, "adapter")
        finally:
            assert "floe" not in sys.modules
    """, tmp_path)
    assert without_floe.returncode != 0
    assert "FLOE_MOE_LORA" in without_floe.stderr.strip().splitlines()[-1], without_floe.stderr[-2000:]


def test_old_format_folder_is_refused_naming_convert_adapter_and_converts_exactly(tmp_path, capsys):
    model = tiny_model("llama")
    model = floe.apply_moe_lora(model, MoELoraConfig(r=2, num_experts=3, layers_to_transform=[0, 2], lora_alpha=6.0, init_lora_weights=False))
    x = ids()
    expected = logits(model, x)
    # the folder FLoE wrote before PEFT: (M, d_out, r) expert stacks, "router" linears
    old = tmp_path / "old"
    old.mkdir()
    tensors = {}
    for name, v in moe_lora_modules(model).items():
        d_out = v.lora_B.shape[0]
        tensors[f"{name}.lora_A.weight"] = v.lora_A.weight.detach().clone()
        tensors[f"{name}.lora_B"] = v.lora_B.detach().reshape(d_out, 3, 2).permute(1, 0, 2).contiguous()
        tensors[f"{name}.router.weight"] = v.router.weight.detach().clone()
    save_file(tensors, str(old / "floe_adapter.safetensors"))
    (old / "floe_adapter_config.json").write_text(json.dumps({
        "format": "floe-moe-lora/1", "r": 2, "num_experts": 3, "alpha": 6.0, "dropout": 0.05,
        "target_modules": ["gate_proj", "up_proj", "down_proj"], "layers": [0, 2], "router_aux_loss_coef": 0.0,
        "base_model_name_or_path": None, "extra": {}}))

    with pytest.raises(AdapterError, match=r"old format.*floe convert-adapter"):
        load_adapter(tiny_model("llama"), old)
    assert main(["convert-adapter", str(old), str(tmp_path / "new")]) == 0
    assert "wrote PEFT adapter" in capsys.readouterr().out
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path / "new")
    assert torch.equal(logits(fresh, x), expected)
    pm = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "new"))
    assert torch.equal(logits(pm, x), expected)
    assert main(["convert-adapter", str(tmp_path / "new"), str(tmp_path / "x")]) == 2
    assert "not an old-format FLoE adapter folder" in capsys.readouterr().err


def test_saved_adapter_names_the_base_model_the_user_asked_for_not_the_loaded_folder(tmp_path, recwarn):
    # a built-in model loads from a folder in this machine's cache; its adapter must name the model, not the folder
    from floe.pipeline.baselines import attach_peft

    model = tiny_model()
    model.config._name_or_path = str(tmp_path / "cache" / "models" / "smollm2-135m")
    model = floe.apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2, base_model_name_or_path="smollm2-135m"))
    floe.save_adapter(model, tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    assert not [w for w in recwarn if "renamed" in str(w.message)]
    plain = tiny_model()
    plain.config._name_or_path = str(tmp_path / "cache" / "models" / "smollm2-135m")
    lora = attach_peft(plain, "lora", MoELoraConfig(r=2, target_modules=["q_proj"],
                                                    base_model_name_or_path="smollm2-135m"), None, 10, seed=0)
    lora.save_pretrained(str(tmp_path / "lora"))
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    model = tiny_model()  # no name asked for: the model's own, as PEFT does
    model.config._name_or_path = "owner/model"
    model = floe.apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2))
    floe.save_adapter(model, tmp_path / "own")
    assert json.loads((tmp_path / "own" / "adapter_config.json").read_text())["base_model_name_or_path"] == "owner/model"


NO_FOLDER = "no-such-model"  # a base model name that is no local folder and no hub id, as a built-in name is


def _saving_warnings(save) -> list[str]:
    """Warnings and log records (WARNING and up) that ``save()`` emits."""
    import logging
    import warnings

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save()
    finally:
        root.removeHandler(handler)
    return [str(w.message) for w in caught] + [r.getMessage() for r in records]


def test_saving_and_loading_an_adapter_whose_base_name_is_no_folder_warns_nothing(tmp_path):
    # PEFT looks base_model_name_or_path up on save to see whether the vocabulary was resized, and
    # warns "Could not find a config file in <name>" when it is not a folder; MoE-LoRA never trains
    # embeddings, so FLoE's saves skip that look-up
    from floe.adapters.naming import attach

    model = tiny_model()
    model = floe.apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2, base_model_name_or_path=NO_FOLDER), seed=0)
    lora = attach(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=NO_FOLDER))

    def save_and_load():
        floe.save_adapter(model, tmp_path / "moe")  # floe train's final adapter
        model.save_pretrained(str(tmp_path / "checkpoint"))  # what the Trainer's checkpoints call
        lora.save_pretrained(str(tmp_path / "lora"))  # a PEFT baseline of floe run
        load_adapter(tiny_model(), tmp_path / "moe")

    assert _saving_warnings(save_and_load) == []
    for folder in ("moe", "checkpoint", "lora"):
        saved = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == NO_FOLDER
    assert not list((tmp_path / "moe").glob("*embed*")) and "embed" not in " ".join(
        peft.utils.load_peft_weights(str(tmp_path / "checkpoint")))


def test_a_training_run_on_a_model_named_by_no_folder_saves_without_the_vocabulary_warning(tmp_path):
    from train_helpers import tokenized

    model = tiny_model()
    model.config._name_or_path = NO_FOLDER
    model = floe.apply_moe_lora(model, MoELoraConfig(r=2, num_experts=2, target_modules=["up_proj"]), seed=0)
    data = tokenized(8, tmp_path)
    cfg = floe.TrainConfig(output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, save_steps=1,
                           report_to=[], progress_bar=False)
    messages = _saving_warnings(lambda: floe.train(model, make_tokenizer(), data, None, cfg))
    assert not [m for m in messages if "config file" in m or "vocabulary" in m], messages
    saved = [tmp_path / "out" / "adapter", *sorted((tmp_path / "out").glob("checkpoint-*"))]
    assert len(saved) >= 2
    for folder in saved:
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == NO_FOLDER
