"""Fine-tune a tiny Llama with DeepSpeed ZeRO and save a ZeRO checkpoint, the way a
DeepSpeed (or Hugging Face Trainer + DeepSpeed) job does. Run under torchrun on CPU:

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 tests/io/zero_finetune.py BASE OUT STAGE [OUT STAGE ...]

One fine-tune per (OUT, STAGE), one after the other in the same ranks (the ranks import
transformers and DeepSpeed once). Each OUT gets the base's config.json and tokenizer files
(as a Trainer ``checkpoint-N/`` has) and DeepSpeed's ``latest`` + ``global_step2/``. ``lm_head.weight`` is frozen, so the
checkpoint also holds a frozen parameter.
"""

import importlib
import os
import shutil
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import LlamaForCausalLM

# DeepSpeed's CPU accelerator JIT-compiles a C++ shared-memory all-reduce (g++, 2-3 minutes of
# both cores, again for every new venv: each clean CI clone) when its communication backend
# starts. Gloo does everything two tiny fine-tunes need.
# (``deepspeed.comm.torch`` as an attribute is the torch package, which deepspeed.comm imports.)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def main(base: str, out: str, stage: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.lm_head.weight.requires_grad_(False)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "bf16": {"enabled": True},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    vocab = model.config.vocab_size
    for step in range(2):
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(100 * step + engine.global_rank))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out)
    if engine.global_rank == 0:
        for f in Path(base).iterdir():
            if f.suffix in (".json", ".model") and not f.name.startswith("model.safetensors"):
                shutil.copy(f, Path(out) / f.name)
    del engine, model


if __name__ == "__main__":
    base, *jobs = sys.argv[1:]
    for out, stage in zip(jobs[::2], jobs[1::2]):
        main(base, out, int(stage))
    # Leave together and close the process group, then exit without the interpreter's
    # teardown: a rank aborted there ("terminate called without an active exception", exit -6:
    # a C++ thread of torch or DeepSpeed still joinable when its destructor ran) in loaded CI
    # runs, once before the group was closed here and once after (session 14). Every
    # checkpoint is saved and its files copied by then.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
