"""The reference for the rank-1 study (README, "The rank-1 discrepancy"): peft's LoRA (or DoRA) trained by a
plain PyTorch loop on lorabench's own sentiment split, outside the harness (no trainer, no random streams).

    .venv/bin/python tests/tools/peft_plain_loop.py --rank 1 --seed 0 [--dora]   # one JSON line

The issue-11 protocol: 2,000 / 1,000 / 2,000 snippets, one epoch of 125 steps of 16, AdamW at lr 2e-3 with
linear decay, no warmup, no clipping, q/v, alpha = 2r, dropout 0, the model's own first-token head.
Seeding as a plain script does it: ``torch.manual_seed(seed)``, then the model (its new head), then peft's
adapters, and the loader's generator seeded with ``seed``. Needs the dev extras (peft); not a test.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments import assets, tasks  # noqa: E402  (data only: the split and tokens the harness's runs see)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dora", action="store_true")
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = tasks.build("sentiment", n_train=2000, n_val=1000, n_test=2000).data

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=["query", "value"], use_dora=args.dora,
                                             modules_to_save=["classifier"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    loader = DataLoader(data.train, batch_size=16, shuffle=True, collate_fn=data.collate, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    steps = len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    model.train()
    t0 = time.time()
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
    model.eval()
    with torch.inference_mode():
        scores = {split: data.evaluate(model, DataLoader(getattr(data, split), batch_size=128,
                                                         collate_fn=data.collate))["accuracy"]
                  for split in ("val", "test")}
    print(json.dumps({"impl": "peft", "variant": "dora" if args.dora else "lora", "rank": args.rank,
                      "seed": args.seed, "steps": steps, **scores, "train_s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
