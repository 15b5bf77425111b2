"""HF+PEFT's loss at every step of the SFT baseline, to tell the model's loss from the training's. GPU only.

    PYTHONPATH=. python3 benchmarks/hf_losses.py SHAPE BATCH SEQ [--4bit] [--bf16-activations]

The settings of ../shared/bench/hf_baseline.py's `sft` (its `build`, called from .bench/; LoRA r=32 alpha=32 on the
seven projections, AdamW lr 1e-4, six steps on the same tokens), printing the loss of each step: step 1 is the
base model's loss on the batch (the adapters start at zero), the later ones follow the optimizer.

--bf16-activations (with --4bit): skip prepare_model_for_kbit_training, which casts every parameter that is not
4-bit (embeddings, norms, lm_head) to float32, so that hidden states, the LoRA sums and the residual stream run
in float32 around bf16 base products; the model then runs in bf16 as the bf16 baseline and gazelle do.
Prints one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".bench"))

from hf_baseline import build  # noqa: E402
from shapes import LORA_TARGETS  # noqa: E402


def main() -> None:
    import peft

    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("batch", type=int)
    ap.add_argument("seq", type=int)
    ap.add_argument("--4bit", dest="q4", action="store_true")
    ap.add_argument("--bf16-activations", action="store_true")
    a = ap.parse_args()
    model = build(a.shape, a.q4)
    if a.q4 and not a.bf16_activations:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    ids = torch.randint(0, 150000, (a.batch, a.seq), device="cuda")
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    print("RESULT", json.dumps(dict(shape=a.shape, q4=a.q4, bf16_activations=a.bf16_activations, losses=losses)),
          flush=True)


if __name__ == "__main__":
    main()
