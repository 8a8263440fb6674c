"""MixLoRA on the real SmolLM2-135M: learning, routing statistics, parameter count, lm-eval's HFLM."""

from __future__ import annotations

import pytest
import torch

from mixlora_lit import MixLoraConfig, get_mixlora_model

pytestmark = pytest.mark.slow

TEXTS = [
    "Question: Which gas do plants absorb for photosynthesis?\nAnswer: carbon dioxide",
    "Question: Which planet is known as the Red Planet?\nAnswer: Mars",
    "Question: What force pulls objects toward the Earth?\nAnswer: gravity",
    "Question: What is frozen water called?\nAnswer: ice",
]


@pytest.fixture
def mixlora_smollm2(fresh_smollm2_fp32):
    model, tokenizer = fresh_smollm2_fp32
    torch.manual_seed(0)
    cfg = MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=8, top_k=2)
    return get_mixlora_model(model, cfg), tokenizer


def test_trainable_parameters_equal_closed_form(mixlora_smollm2):
    mix, _ = mixlora_smollm2
    c = mix.config
    d, f, layers, hd = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim
    q_out, kv_out = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attention = 16 * ((d + q_out) + 2 * (d + kv_out) + (q_out + d))
    experts = 8 * 3 * 16 * (d + f)
    router = 8 * d
    assert mix.get_nb_trainable_parameters()[0] == layers * (attention + experts + router) == 26_311_680


def test_a_few_steps_lower_the_loss_and_routing_counts_add_up(mixlora_smollm2):
    mix, tokenizer = mixlora_smollm2
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in mix.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.01)
    mix.train()
    losses = []
    for _ in range(4):
        out = mix(**batch, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        counts = mix.routing_statistics(batch["attention_mask"])
        assert counts.shape == (30, 8)
        real_tokens = int(batch["attention_mask"].sum())
        assert counts.sum(dim=1).tolist() == [real_tokens * 2] * 30
    mix.eval()
    with torch.no_grad():
        final = mix(**batch, labels=labels).loss.item()
    assert final < 0.8 * losses[0], (losses, final)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_hflm_takes_the_wrapped_model_as_is(mixlora_smollm2):
    """lm-eval's HFLM scores with our model; its loglikelihood equals one computed from our logits."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    mix, tokenizer = mixlora_smollm2
    with torch.no_grad():
        for name, param in mix.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    mix.eval()
    lm = HFLM(pretrained=mix, tokenizer=tokenizer, batch_size=2)
    context, continuation = "The capital of France is", " Paris"
    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (loglik, greedy), = lm.loglikelihood([request])
    ctx_ids = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    cont_ids = full[len(ctx_ids):]
    with torch.no_grad():
        logprobs = torch.log_softmax(mix(input_ids=torch.tensor([full])).logits[0].float(), -1)
    expected = sum(logprobs[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids))
    assert loglik == pytest.approx(expected, abs=1e-3)
    assert mix.training is False
