"""`mixlora-lit demo`: the library end to end on a real offline model, in about a minute on CPU."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .base_models import load_base_model
from .config import MixLoraConfig
from .model import MixLoraModel, get_mixlora_model

_TEXTS = [
    "Question: Which gas do plants take in for photosynthesis?\nAnswer: carbon dioxide",
    "Question: What is the boiling point of water at sea level in Celsius?\nAnswer: 100 degrees",
    "Question: Which planet is known as the Red Planet?\nAnswer: Mars",
    "Question: What force pulls objects toward the Earth?\nAnswer: gravity",
]


def run_demo(base: str = "smollm2-135m", out_dir: str = "runs/demo", steps: int = 3, seed: int = 42) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, tokenizer = load_base_model(base, dtype="auto")
    print(f"loaded {base} ({type(model).__name__}) in {time.perf_counter() - t0:.1f}s")
    config = MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=8, top_k=2)
    mix = get_mixlora_model(model, config)
    mix.print_trainable_parameters()

    batch = tokenizer(_TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in mix.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    mix.train()
    losses = []
    for step in range(steps):
        t = time.perf_counter()
        out = mix(**batch, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        print(f"step {step}: loss {out.loss.item():.4f} (aux {out.aux_loss.item():.5f}) "
              f"in {time.perf_counter() - t:.2f}s")
    counts = mix.routing_statistics(batch["attention_mask"])
    print(f"routing, layer 0 tokens per expert: {counts[0].tolist()} "
          f"(sum {int(counts[0].sum())} = {int(batch['attention_mask'].sum())} tokens x top_k {config.top_k})")

    mix.eval()
    adapter_dir = Path(out_dir) / "adapter"
    mix.save_pretrained(adapter_dir)
    with torch.no_grad():
        logits = mix(**batch).logits
    fresh, _ = load_base_model(base, dtype="auto")
    reloaded = MixLoraModel.from_pretrained(fresh, adapter_dir)
    with torch.no_grad():
        logits2 = reloaded(**batch).logits
    same = torch.equal(logits, logits2)
    print(f"saved adapter to {adapter_dir} ({sorted(p.name for p in adapter_dir.iterdir())}); "
          f"reloaded logits identical: {same}")

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    print("generate():", repr(tokenizer.decode(generated[0], skip_special_tokens=True)))
    print(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return {"losses": losses, "reload_identical": same}
