"""Step-time benchmark: our LoRA and DoRA against peft's, on MiniLM-sized Linear layers.

One "block" is the six Linear shapes of a MiniLM-L12 layer run as a chain (query, key, value, attention
output 384->384, intermediate 384->1536, output 1536->384), every one adapted (rank 8, alpha 16). A step
is forward + backward + AdamW on 16 x 64 tokens. Methods are interleaved (the order rotates every
round) and each reports the median over rounds of the mean step time within a round. Timings are
printed and saved, never asserted.

    python -m experiments.bench                      # CPU, 2 threads, float32 (`make bench`)
    python -m experiments.bench --device cuda --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import OrderedDict

import torch
from torch import nn

import variants

SHAPES = [("query", 384, 384), ("key", 384, 384), ("value", 384, 384), ("attn_out", 384, 384),
          ("intermediate", 384, 1536), ("output", 1536, 384)]
REFERENCE = "peft DoRA"  # the ratio columns compare against this and against "ours LoRA"


def base_model(blocks: int, device: str, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    layers = OrderedDict((f"{name}{i}", nn.Linear(fan_in, fan_out))
                         for i in range(blocks) for name, fan_in, fan_out in SHAPES)
    return nn.Sequential(layers).to(device, dtype)


def build(method: str, dropout: float, args) -> nn.Module:
    model = base_model(args.blocks, args.device, getattr(torch, args.dtype))
    impl, kind = method.split()  # "ours LoRA", "peft DoRA", ...
    if impl == "ours":
        v = variants.create(kind.lower(), rank=args.rank, alpha=2.0 * args.rank, dropout=dropout,
                            targets="all-linear", train_head=False)
        return v.apply(model).train()
    import peft  # a dev dependency: the reference implementation

    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout,
                          target_modules=[n for n, _ in model.named_children()], use_dora=kind == "DoRA")
    return peft.get_peft_model(model, cfg).train()


def make_step(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> list[dict]:
    methods = ["ours LoRA", "ours DoRA"]
    try:
        import peft  # noqa: F401

        methods += ["peft LoRA", "peft DoRA"]
    except ImportError:
        print("peft is not installed: timing our methods only")
    x = torch.randn(args.batch, args.seq, SHAPES[0][1], device=args.device, dtype=getattr(torch, args.dtype))
    cases = [(m, d) for d in args.dropouts for m in methods]
    steps = {case: make_step(build(*case, args), x) for case in cases}
    times: dict[tuple[str, float], list[float]] = {case: [] for case in cases}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    for r in range(args.repeats):
        for case in cases[r % len(cases):] + cases[: r % len(cases)]:  # rotate the order every round
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.inner):
                steps[case]()
            sync(args.device)
            times[case].append((time.perf_counter() - t0) * 1000 / args.inner)
    rows = []
    for method, dropout in cases:
        ms = statistics.median(times[method, dropout])
        ref = {m: statistics.median(times[m, dropout]) for m in (REFERENCE, "ours LoRA")
               if (m, dropout) in times}
        rows.append({"method": method, "dropout": dropout, "ms_per_step": ms,
                     "min_ms": min(times[method, dropout]), "max_ms": max(times[method, dropout]),
                     "vs_peft_dora": ms / ref[REFERENCE] if REFERENCE in ref else None,
                     "vs_ours_lora": ms / ref["ours LoRA"]})
    return rows


def table(rows: list[dict]) -> str:
    def ratio(r):
        return "n/a" if r is None else f"{r:.2f}x"

    lines = ["| method | dropout | ms/step (median) | min-max | vs peft DoRA | vs ours LoRA |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['dropout']:g} | {r['ms_per_step']:.1f} | {r['min_ms']:.1f}-"
              f"{r['max_ms']:.1f} | {ratio(r['vs_peft_dora'])} | {ratio(r['vs_ours_lora'])} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per method (median reported)")
    p.add_argument("--inner", type=int, default=3, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--blocks", type=int, default=1, help="MiniLM layers' worth of Linear shapes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--out", default=None, help="JSON path (default results/bench/dora-<time>.json)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    rows = run(args)
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine()
    shapes = ", ".join(f"{a}->{b}" for _, a, b in SHAPES)
    print(f"fwd+bwd+AdamW per step; {args.blocks} block(s) of {shapes}; {args.batch}x{args.seq} tokens, "
          f"rank {args.rank}, {args.dtype}, {args.device} ({device}), {args.threads} threads; "
          f"median of {args.repeats} rounds x {args.inner} steps\n")
    print(table(rows))

    out = args.out or os.path.join("results", "bench", f"dora-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    with open(out, "w") as f:
        json.dump({"config": vars(args), "device_name": device, "torch": torch.__version__,
                   "peft": peft_version, "shapes": SHAPES, "seconds": time.perf_counter() - t0, "rows": rows},
                  f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
