"""Tiny models for tests: the LoRA-on-MNIST MLP and randomly initialised 2-layer BERT / Llama (no download)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 99


def mlp(seed: int = 0) -> nn.Sequential:
    """784 -> 1000 -> 2000 -> 10: 2,807,010 params (the classic LoRA-on-MNIST network)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))


def mlp_batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 784, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}


def tiny_bert(seed: int = 0, num_labels: int = 3, dtype=torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float32, num_labels: int | None = None):
    """A 2-layer GPT-2: attention c_attn (fused q, k, v) and c_proj, MLP c_fc and c_proj are transformers
    ``Conv1D`` (weights stored in x out). A causal LM, or a sequence classifier with ``num_labels``."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, num_labels=num_labels or 2, pad_token_id=0)
    model = GPT2ForSequenceClassification(cfg) if num_labels else GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def token_batch(n: int = 4, seq: int = 8, num_labels: int | None = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.randint(0, num_labels, (n,), generator=g) if num_labels else ids.clone()
    return batch


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """Task loss for any of the tiny models (MLP: cross-entropy on x/y; transformers: outputs.loss)."""
    if "x" in batch:
        return nn.functional.cross_entropy(model(batch["x"]), batch["y"])
    return model(**batch).loss


def output_of(model: nn.Module, batch: dict) -> torch.Tensor:
    if "x" in batch:
        return model(batch["x"])
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# name -> (model factory, batch factory, variant options that fit it)
MODELS = {
    "mlp": (mlp, mlp_batch, {"targets": "all-linear"}),
    "bert": (tiny_bert, lambda: token_batch(num_labels=3), {"targets": ["query", "value"]}),
    "llama": (tiny_llama, lambda: token_batch(num_labels=None), {"targets": "all-linear", "train_head": False}),
}
