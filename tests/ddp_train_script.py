"""Run by test_train_ddp under torchrun: two training steps, each rank dumps its adapter."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from conftest import make_tokenizer, tiny_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from train_helpers import tokenized  # noqa: E402

from floe.adapters.moe_lora import MoELoraConfig, adapter_state_dict, apply_moe_lora  # noqa: E402
from floe.training import TrainConfig, train  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
data = tokenized(16, out / f"data{rank}")
model = tiny_model("llama")
torch.manual_seed(rank)  # different adapter init per rank: DDP must broadcast rank 0's
model = apply_moe_lora(model, MoELoraConfig(r=4, num_experts=2, lora_dropout=0.05))
init = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
cfg = TrainConfig(output_dir=str(out / "run"), learning_rate=1e-2, max_steps=2, batch_size=2, logging_steps=1,
                  save_steps=100, report_to=[], progress_bar=False, seed=rank + 5)  # different seeds on purpose
train(model, make_tokenizer(), data, None, cfg)
state = {k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()}
state.update({f"init.{k}": v for k, v in init.items()})
save_file(state, str(out / f"rank{rank}.safetensors"))
