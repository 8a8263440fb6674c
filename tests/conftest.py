"""Shared fixtures: tiny random models (fast, fp64-capable) and the real offline SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# Tests that share an expensive module fixture, run by one pytest-xdist worker (which then builds the
# fixture once) instead of split over both. xdist's own `--dist loadgroup` does not group under
# pytest 9.2 (pytest-xdist issue 1386), so make test's default `load` mode gets this scheduler.
XDIST_GROUPS = {
    "tests/test_reliability.py::test_user_errors_are_one_line_naming_the_culprit": "catalogue",  # ~25 s
    "tests/test_reliability.py::test_the_non_finite_step_is_named_and_its_last_good_checkpoint_kept": "catalogue",
    "tests/test_reliability.py::test_sigkill_mid_epoch_then_ckpt_path_last_ends_like_an_uninterrupted_fit":
        "reference",  # the reference fit, ~15 s
    "tests/test_reliability.py::test_sigterm_writes_a_checkpoint_at_that_step_and_the_run_resumes_exactly": "reference",
    "tests/test_hub_data.py": "hub_data",  # lm-eval's TaskManager, ~18 s
    "tests/test_datamodule.py": "datamodule",  # the paper5 data module, ~11 s
}


def xdist_group(nodeid: str) -> str | None:
    test = nodeid.split("[", 1)[0]
    return XDIST_GROUPS.get(test) or XDIST_GROUPS.get(test.split("::", 1)[0])


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: no error where xdist is off (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":
        return None  # another --dist mode asked for: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class GroupedLoad(LoadScopeScheduling):
        """`load` scheduling, except that each XDIST_GROUPS group is one unit of work."""

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid) or nodeid

    return GroupedLoad(config, log)


def tiny_llama(dtype=torch.float64, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype).eval()


def tiny_gemma3(dtype=torch.float64, seed: int = 0, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
                  hidden_activation="gelu_pytorch_tanh")
    kwargs.update(overrides)
    return Gemma3ForCausalLM(Gemma3TextConfig(**kwargs)).to(dtype).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Give every adapter tensor a random value (B starts at zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("lora_A", "lora_B", "moe_gate")):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * scale)
            elif "lora_magnitude" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen, dtype=torch.float64).to(param.dtype))


def batch(vocab: int = 97, seed: int = 3, lengths=(9, 6)):
    """Right-padded input ids with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


@pytest.fixture(scope="session")
def smollm2_fp32():
    from mixlora_lit.base_models import load_base_model

    return load_base_model("smollm2-135m", dtype="fp32")


@pytest.fixture
def fresh_smollm2_fp32():
    from mixlora_lit.base_models import load_base_model

    return load_base_model("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """All 8 tasks prepared from the real OLMo data into a fresh directory (about 12 s on 2 cores)."""
    from mixlora_lit.data.prepare import prepare

    out = tmp_path_factory.mktemp("data")
    manifest = prepare(tasks=["all"], source="olmo", out=out, progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from mixlora_lit.base_models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama saved with the real SmolLM2 tokenizer: loads through the same path as a real base."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(dtype=torch.float32, vocab_size=len(smollm2_tokenizer), hidden_size=48, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=True)
    model.config.eos_token_id = smollm2_tokenizer.eos_token_id
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def fit_args(tiny_model_dir, prepared_data, root, *extra, method="mixlora", steps=3):
    """`mixlora-lit fit` arguments for a few-second run of the tiny model on the real data."""
    data_dir, _ = prepared_data
    return ["fit", f"--model.base={tiny_model_dir}", "--model.base_dtype=fp32", f"--model.adapter.method={method}",
            "--model.adapter.r=4", "--model.adapter.lora_alpha=8", "--model.adapter.num_experts=4",
            "--model.optimizer.lr=1e-3", f"--data.data_dir={data_dir}", "--data.train_cap=24", "--data.dev_cap=6",
            "--data.test_cap=6", "--data.batch_size=4", "--data.eval_batch_size=8", f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}", "--trainer.num_sanity_val_steps=0",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}", "--seed_everything=7",
            *extra]
