"""Measured peak GPU memory of qt's QLoRA fine-tuning step next to `qt-train plan --task`'s prediction.

    python benchmarks/qlora_memory.py --preset Llama-3.1-8B --seq-len 1024 --micro-batch 1
    python benchmarks/qlora_memory.py --preset Llama-3.1-8B --layers 4 --seq-len 2048 --task dpo

Builds a random-weight model of a preset's shape (`--layers N` keeps N blocks: quicker, and the plan is
made for the same shape), puts it through qt's real path, train.lora.Lora(..., qlora=True) (bitsandbytes
NF4 via quantize_base, peft LoRA on all seven projections) with train.pretrain.checkpoint_blocks, and runs
`--steps` optimizer steps the way Trainer.train_step does (bf16 autocast, the SFT loss of train.sft or the
DPO loss of train.dpo, clip, AdamW, zero_grad). The model is bf16, as `qt-train --qlora` loads it. For DPO
it first runs the reference pass as PreferenceTuning does under --qlora (the quantized model, its adapter
still zero, no grad). Prints one JSON object:
torch.cuda.max_memory_allocated / reserved and the device's used memory, against the planner's
allocated bytes (its total less overhead) and its total. Needs CUDA and bitsandbytes (pip install -e '.[gpu]').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from qt_serve.model import Transformer, rope_tables
from train import dpo, lora, planner, sft
from train.pretrain import checkpoint_blocks


def random_model(cfg) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)  # as finetune.load_init loads a --qlora base
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
        cos, sin = rope_tables(cfg, model.max_seq_len)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    return model


def peak(fn) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
            "device_used_now": total - free,  # CUDA context + what the caching allocator holds
            "outside_allocator_now": total - free - torch.cuda.memory_reserved(),  # ~ planner.CUDA_CONTEXT
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Llama-3.1-8B", choices=list(planner.PRESETS))
    ap.add_argument("--layers", type=int, default=0, help="keep this many blocks (0: all)")
    ap.add_argument("--task", choices=planner.TASKS, default="sft")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-grad-checkpointing", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("qlora_memory.py needs a CUDA GPU: QLoRA's NF4 base is bitsandbytes' CUDA kernels (nothing measured)")
    dev = torch.device("cuda")
    cfg = planner.preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers, layer_types=None)
    gc = not args.no_grad_checkpointing
    L, B = args.seq_len, args.micro_batch
    plan = planner.finetune_plan(cfg, L, B, torch.cuda.get_device_properties(dev).total_memory, args.task,
                                 args.lora_rank, qlora=True, precision="bf16", grad_checkpointing=gc)
    model = random_model(cfg)
    out = {"preset": args.preset, "layers": cfg.num_hidden_layers, "task": args.task, "seq_len": L,
           "micro_batch": B, "grad_checkpointing": gc, "device": torch.cuda.get_device_name(dev)}
    g = torch.Generator().manual_seed(1)
    lora.Lora(model, args.lora_rank, 32.0, 0.05, list(lora.ALL_LINEAR), "random", qlora=True, device=dev)
    model.to(dev)
    if args.task == "dpo":  # the reference pass, as PreferenceTuning.build runs it under --qlora
        ids = torch.randint(0, cfg.vocab_size, (2 * B, L + 1), generator=g).to(dev)

        def reference():
            model.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                dpo.sequence_logps(model(ids[:, :-1]), ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.bool))

        out["reference_pass"] = peak(reference)  # planned to stay below the training step
    model.train()
    if gc:
        checkpoint_blocks(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4)
    rows = 2 * B if args.task == "dpo" else B
    ids = torch.randint(0, cfg.vocab_size, (rows, L + 1), generator=g).to(dev)
    batch = {"ids": ids, "target": torch.ones_like(ids, dtype=torch.bool), "pos": torch.arange(L + 1, device=dev)
             .expand(rows, L + 1), "doc": torch.zeros_like(ids)}  # one example a row: the SFT document mask
    ref = torch.zeros(rows, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if args.task == "sft":
                loss = sft.sft_loss(model, batch, cfg.windows())[0]
            else:
                logps = dpo.sequence_logps(model(ids[:, :-1]), ids[:, 1:], batch["target"][:, 1:])
                loss = dpo.dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=0.1)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step creates AdamW's state
    out["trained_params"] = sum(p.numel() for p in trained)
    out["train_step"] = {**peak(lambda: [step() for _ in range(args.steps)]),
                         "planned_allocated": plan["breakdown"]["total"] - plan["breakdown"]["overhead"],
                         "planned_total": plan["breakdown"]["total"], "planned_breakdown": plan["breakdown"],
                         "planned_peak_phase": plan["peak_phase"]}
    m = out["train_step"]
    m["allocated_over_planned"] = round(m["max_allocated"] / m["planned_allocated"], 3)
    out["planned_trainable"] = plan["trainable"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
