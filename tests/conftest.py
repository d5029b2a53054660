"""Shared fixtures: tiny random-initialised causal LMs and a small offline tokenizer.

Nothing here touches the network: models are built from configs, the tokenizer
is a byte-level BPE trained in memory on a few sentences.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHS = ("llama", "qwen2", "gemma")


def tiny_config(arch: str = "llama", **overrides) -> transformers.PretrainedConfig:
    """A 4-layer model of the given family; GQA (4 query heads, 2 kv heads) by default."""
    common = dict(
        vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**{**common, **overrides})
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, **overrides})
    elif arch == "gemma":
        # Gemma-style: head_dim differs from hidden_size / num_heads.
        cfg = transformers.GemmaConfig(**{**common, "head_dim": 16, **overrides})
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**{**common, **overrides})
    else:
        raise ValueError(arch)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.eval()
    return model


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model_factory():
    return tiny_model


_TOKENIZER = None


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 320) with ChatML special tokens and chat template."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        corpus = ["The capital of France is Paris.", "Answer the question with one word.",
                  "user assistant system", "Translate the sentence into French."] * 20
        tok.train_from_iterator(corpus, trainer=trainer)
        _TOKENIZER = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
        )
        _TOKENIZER.chat_template = CHATML
    return _TOKENIZER


@pytest.fixture
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
