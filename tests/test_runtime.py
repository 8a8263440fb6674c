"""The allocator setting the `mixlora-lit` command applies, and the step benchmark end to end."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Page faults in each of six cycles that allocate, write and free a 256 MB buffer. glibc gives the
# memory back to the kernel on free, so every cycle faults its pages in again; with the setting
# the memory stays in the process. (The heap may grow once more before reuse starts: torch asks
# for aligned memory, and the aligned request can be slightly larger than the freed chunk.)
# The setting is applied as `mixlora-lit` applies it: first thing, before torch and the libraries it
# loads map memory next to the heap (glibc falls back to mmap when the heap cannot grow in place).
_REFAULTS = """
import json, resource, sys
from mixlora_lit.runtime import allocator_tuned, tune_cpu_allocator
if sys.argv[1] == "tuned":
    assert tune_cpu_allocator() and allocator_tuned()
import torch
import mixlora_lit.model
faults = []
for i in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = torch.empty(64 * 2**20, dtype=torch.float32).fill_(float(i))
    del buf
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _refaults(mode: str, **env: str) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    pages = 256 * 2**20 // 4096
    default, tuned = _refaults("default"), _refaults("tuned")
    assert all(f > pages // 4 for f in default[3:]), default  # (transparent huge pages can cut the count)
    assert sum(tuned[3:]) < pages // 100, tuned
    assert sum(tuned) < 2 * pages + pages // 10, tuned


def test_allocator_setting_can_be_turned_off():
    proc = subprocess.run([sys.executable, "-c", "from mixlora_lit.runtime import tune_cpu_allocator as t; print(t())"],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "MIXLORA_LIT_MALLOC_TUNING": "0"})
    assert proc.stdout.strip() == "False", proc.stderr


def test_step_benchmark_writes_the_issue_keys(tmp_path, tiny_model_dir):
    """A tiny run of benchmarks/bench_step.py (a tiny base: the real SmolLM2 cost 14 s more; the README's
    benchmark commands time it): every method it times, the ratio keys of the issue, and ratios that are the
    quotients of the medians it reports."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--base", str(tiny_model_dir), "--batch", "1",
           "--seq", "32",
           "--threads", "1",  # beside the other test worker (tests/run.sh)
           "--repeats", "2", "--warmup", "1", "--methods", "base", "lora", "fused", "reference",
           "--json", str(out), "--markdown", str(tmp_path / "bench.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    m = results["methods"]
    assert set(m) == {"base", "lora", "fused", "reference"} and results["settings"]["base"] == str(tiny_model_dir)
    assert results["step_ratio_vs_lora"] == pytest.approx(m["fused"]["median_s"] / m["lora"]["median_s"])
    assert results["step_ratio_vs_reference"] == pytest.approx(m["fused"]["median_s"] / m["reference"]["median_s"])
    assert results["step_ratio_vs_base"] == pytest.approx(m["fused"]["median_s"] / m["base"]["median_s"])
    assert results["peak_mem_ratio_vs_lora"] == pytest.approx(m["fused"]["peak_rss_mb"] / m["lora"]["peak_rss_mb"])
    # each round's ratio pairs that round's steps, and the interval is over those rounds
    for key, other in (("step_ratio_vs_base", "base"), ("step_ratio_vs_lora", "lora")):
        rounds = [f / o for f, o in zip(m["fused"]["round_s"], m[other]["round_s"], strict=True)]
        assert len(rounds) == 2 and results["round_ratios"][key] == pytest.approx(rounds)
        assert results["intervals"][key]["rounds"] == 2 and results["intervals"][key]["target"] in (1.15, 0.8)
        assert results["intervals"][key]["low"] <= statistics.geometric_mean(rounds) <= results["intervals"][key]["high"]
    assert "`step_ratio_vs_base`: geometric mean" in (tmp_path / "bench.md").read_text()
    # the methods' order flips every round; the first timed round (after the warm-up) runs them as given
    methods = ["base", "lora", "fused", "reference"]
    assert results["round_orders"] == [methods[::-1], methods, methods[::-1]]
    assert results["allocator_tuned"] is sys.platform.startswith("linux")
    assert "| fused |" in (tmp_path / "bench.md").read_text()


def test_op_count_benchmark_counts_every_dispatched_operator(tmp_path):
    """benchmarks/count_ops.py: its counter sees each ATen call of a hand-counted function (views marked),
    and on a one-layer SmolLM2 (real config, random weights) the sync-free layout dispatches fewer
    operators than the padded default layout, with ratios that are the quotients of the counts."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_ops

    x = torch.randn(3, 3, requires_grad=True)
    calls = count_ops.counted_step(lambda t: torch.mm(t, t.t()).sum(), x)
    assert dict(calls) == {"aten.mm": 1, "view:aten.t": 1, "aten.sum": 1}
    out = tmp_path / "ops.json"
    results = count_ops.main(["--shape", "1x16", "--layers", "1", "--threads", "1", "--methods", "lora", "fused",
                              "fused_syncfree", "--json", str(out)])
    m = results["models"]["smollm2-135m"]["methods"]
    assert m["fused_syncfree"]["ops"] < m["fused"]["ops"]
    for entry in m.values():
        assert entry["ratio_vs_lora"] == pytest.approx(entry["ops"] / m["lora"]["ops"])
        assert entry["views"] + entry["non_views"] == entry["ops"] > 0
    assert json.loads(out.read_text())["models"]["smollm2-135m"]["methods"]["lora"]["ops"] == m["lora"]["ops"]


def test_real_batch_benchmark_times_the_data_modules_batches(tmp_path, tiny_model_dir, prepared_data):
    """benchmarks/bench_real_batches.py on the quickstart config's own batches (a tiny base here): the
    batches it reports are the data module's first training batches, and its ratios are the quotients
    of the pass times it reports."""
    from mixlora_lit.lightning.datamodule import MultiTaskDataModule

    data_dir, _ = prepared_data
    out = tmp_path / "real.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_real_batches.py"), "--base", str(tiny_model_dir),
           "--data-dir", str(data_dir), "--batches", "2", "--warmup", "1", "--rounds", "2", "--threads", "1",
           "--methods", "base", "fused", "lora", "ideal", "--json", str(out), "--markdown", str(tmp_path / "real.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    m = results["methods"]
    assert set(m) == {"base", "fused", "lora", "ideal"}
    assert results["fused_ratio_vs_ideal"] == pytest.approx(m["fused"]["pass_median_s"] / m["ideal"]["pass_median_s"])
    assert results["real_batch_ratio_vs_base"] == pytest.approx(m["fused"]["pass_median_s"] / m["base"]["pass_median_s"])
    assert results["real_batch_ratio_vs_lora"] == pytest.approx(m["fused"]["pass_median_s"] / m["lora"]["pass_median_s"])
    assert set(results["intervals"]) == set(results["round_ratios"])
    assert len(results["round_ratios"]["real_batch_ratio_vs_base"]) == 2  # one ratio per pass
    assert results["intervals"]["real_batch_ratio_vs_base"]["rounds"] == 2
    # the methods' order flips from batch to batch and, on the same batch, from pass to pass
    methods = ["base", "fused", "lora", "ideal"]
    assert results["batch_orders"] == [methods, methods[::-1], methods[::-1], methods]
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    dm = MultiTaskDataModule(**{**config["data"], "data_dir": str(data_dir)})
    dm.setup("fit")
    batches = [b for _, b in zip(range(3), dm.train_dataloader())][1:]  # after the one warm-up batch
    assert results["batch_shapes"] == [list(b["input_ids"].shape) for b in batches]
    assert results["real_tokens_per_pass"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert "| fused |" in (tmp_path / "real.md").read_text()


def test_ideal_experts_compute_k_lora_experts_per_token_weighted_by_the_router():
    """benchmarks/ideal_experts.py, the routing-free floor of bench_real_batches: on a Llama FFN (fp64,
    random weights) its output is, token by token, sum_j w_j [W2 h_j + s B_down,j A_down,j h_j] with
    h_j = act(W1 x + s B_gate,j A_gate,j x) * (W3 x + s B_up,j A_up,j x) and w the router's renormalised
    top-k probabilities, computed here one token and slot at a time; the backward reaches every weight."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ideal_experts

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=12, intermediate_size=20, num_attention_heads=2, hidden_act="silu")).double()
    model = torch.nn.Sequential(mlp)
    assert ideal_experts.make_ideal(model, num_experts=4, top_k=2, r=3, lora_alpha=6) == 1
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    out = model(x)
    s, m = 2.0, mlp
    probs = torch.softmax(x @ m.ideal_router.t(), dim=-1)
    for b in range(2):
        for t in range(5):
            xt = x[b, t]
            top = probs[b, t].topk(2).values
            want = torch.zeros(12, dtype=torch.float64)
            for j, w in enumerate(top / top.sum()):
                a_g, a_u = m.ideal_a_gu[j, :3], m.ideal_a_gu[j, 3:]
                gate = m.gate_proj.weight @ xt + s * m.ideal_b_g[j] @ (a_g @ xt)
                up = m.up_proj.weight @ xt + s * m.ideal_b_u[j] @ (a_u @ xt)
                h = torch.nn.functional.silu(gate) * up
                want += w * (m.down_proj.weight @ h + s * m.ideal_b_d[j] @ (m.ideal_a_d[j] @ h))
            torch.testing.assert_close(out[b, t], want)
    out.square().sum().backward()
    ideal = [p for n, p in mlp.named_parameters() if n.startswith("ideal_")]
    assert len(ideal) == 6 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ideal)


def test_moe_layer_benchmark_times_each_path_it_names(tmp_path):
    """benchmarks/bench_moe_layer.py, tiny: without autograd a few tokens take the dense path and many
    the sorted one (as `MixLoraMoeFFN.current_path` decides), training the fused path; each ratio is
    the quotient of the medians it reports, and the JSON holds what main() returned."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_moe_layer

    out = tmp_path / "layer.json"
    results = bench_moe_layer.main(["--tokens", "4", "300", "--repeats", "2", "--warmup", "0", "--json", str(out)])
    assert [r["path"] for r in results["rows"]] == ["dense_inference", "fused"]
    trained = bench_moe_layer.main(["--mode", "train", "--tokens", "64", "--repeats", "1", "--warmup", "0"])
    for row in results["rows"] + trained["rows"]:
        assert row["ratio_vs_base"] == pytest.approx(row["mixlora_ms"] / row["base_ms"]) and row["base_ms"] > 0
    assert trained["rows"][0]["path"] == "fused" and json.loads(out.read_text())["rows"] == results["rows"]


def test_decode_benchmark_gathers_experts_below_the_row_limit_and_reports_quotients(tmp_path, tiny_model_dir):
    """benchmarks/bench_decode.py, tiny: its gathered variant gathers one sequence's decoding step (2 rows)
    and not four sequences' (8 rows), the library's default (E // 4 = 1 row for 4 experts) neither, the ratios
    are the quotients of the medians it reports, both paths pick the same tokens, and the JSON holds what
    main() returned."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_decode
    import bench_step

    out = tmp_path / "decode.json"
    results = bench_decode.main(["--base", str(tiny_model_dir), "--dtype", "fp32", "--experts", "4", "--rank", "4",
                                 "--batch", "1", "4", "--prompt", "5", "--steps", "2", "--rounds", "3", "--threads",
                                 "1", "--malloc", "default", "--json", str(out)])
    rows = results["rows"]
    assert [(r["batch"], r["gathered_variant_path"], r["default_path"]) for r in rows] == [
        (1, "gathered_inference", "dense_inference"), (4, "dense_inference", "dense_inference")]
    for r in rows:
        assert r["gathered_vs_dense"] == pytest.approx(r["gathered_ms"] / r["dense_ms"]) and r["dense_ms"] > 0
        assert r["gathered_vs_base"] == pytest.approx(r["gathered_ms"] / r["base_ms"]) and r["same_tokens"]
        # each round's ratio pairs that round's times, and the interval is over those rounds
        t = r["round_ms"]
        per_round = [g / d for g, d in zip(t["gathered"], t["dense"], strict=True)]
        assert len(per_round) == 3 and r["gathered_vs_dense_per_round"] == pytest.approx(per_round)
        assert r["dense_vs_base_per_round"] == pytest.approx([d / b for d, b in zip(t["dense"], t["base"])])
        assert r["intervals"]["gathered_vs_dense"] == pytest.approx(bench_step.ratio_interval("gathered_vs_dense",
                                                                                                per_round))
    assert json.loads(out.read_text())["rows"] == rows


def test_inference_benchmark_reports_the_eval_and_generation_ratios(tmp_path, tiny_model_dir, prepared_data):
    """benchmarks/bench_inference.py, tiny: the issue's eval and generation ratios are the quotients of the
    medians it reports, merged and unmerged agree, and `--profile` writes each model's generate() profile."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_inference

    data_dir, _ = prepared_data
    out, profiles = tmp_path / "inference.json", tmp_path / "profiles"
    results = bench_inference.main([
        "--base", str(tiny_model_dir), "--dtype", "fp32", "--experts", "4", "--rank", "4", "--tasks", "arc_easy",
        "boolq", "--limit", "4", "--eval-batch", "4", "--gen-batch", "2", "--new-tokens", "3", "--repeats", "2",
        "--threads", "1", "--malloc", "default", "--data-dir", str(data_dir), "--json", str(out),
        "--profile", str(profiles)])
    m = results["models"]
    assert set(m) == {"base", "mixlora", "merged"} and results["eval_examples"] == 2 * 4
    assert results["mixlora_vs_base_eval_time"] == pytest.approx(m["mixlora"]["eval_s"] / m["base"]["eval_s"])
    assert results["mixlora_vs_base_generate_time"] == pytest.approx(m["mixlora"]["generate_s"] / m["base"]["generate_s"])
    assert results["merged_same_label_token_acc"] and results["merged_same_generations"]
    # the order flips every round (warm-up first), and each round's ratio pairs that round's times
    order = ["base", "mixlora", "merged"]
    assert results["round_orders"] == [order, order[::-1], order]
    rounds = results["rounds"]
    for work in ("eval", "generate"):
        per_round = [a / b for a, b in zip(rounds[f"mixlora_{work}_s"], rounds[f"base_{work}_s"], strict=True)]
        assert len(per_round) == 2 and rounds[f"mixlora_vs_base_{work}_time"] == pytest.approx(per_round)
        assert results["intervals"][f"mixlora_vs_base_{work}_time"]["rounds"] == 2
    for name in ("base", "mixlora"):
        assert "aten::mm" in (profiles / f"generate_{name}.txt").read_text()
    assert json.loads(out.read_text())["mixlora_vs_base_generate_time"] == results["mixlora_vs_base_generate_time"]


def test_ratio_intervals_cover_the_true_ratio_at_their_level_and_give_the_target_verdicts():
    """benchmarks/bench_step.py's `ratio_interval` (used by every benchmark with rounds): over log-normal rounds
    with a known geometric mean, its 95% intervals contain that mean in about 95% of runs with three rounds
    (a normal quantile instead of Student's t would cover about 81%), agree with scipy's one-sample t-test
    interval on the logs, and a target's verdict is `met` / `missed` only when the whole interval is on one side."""
    import math

    import numpy as np
    from scipy import stats

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    rng = np.random.default_rng(0)
    truth, trials = 1.2, 4000
    hits = 0
    for _ in range(trials):
        rounds = np.exp(rng.normal(math.log(truth), 0.1, size=3)).tolist()
        iv = bench_step.ratio_interval("any_ratio", rounds)
        hits += iv["low"] <= truth <= iv["high"]
    assert 0.935 <= hits / trials <= 0.965
    rounds = [1.174, 1.324, 1.157, 1.352, 1.328]
    iv = bench_step.ratio_interval("mixlora_vs_base_eval_time", rounds)
    ci = stats.ttest_1samp(np.log(rounds), 0.0).confidence_interval(0.95)
    assert (math.log(iv["low"]), math.log(iv["high"])) == pytest.approx((ci.low, ci.high))
    assert iv["geometric_mean"] == pytest.approx(stats.gmean(rounds)) and iv["rounds"] == 5
    assert iv["target"] == 1.25 and iv["verdict"] == "undecided"
    assert bench_step.ratio_interval("mixlora_vs_base_eval_time", [1.10, 1.12, 1.11])["verdict"] == "met"
    assert bench_step.ratio_interval("step_ratio_vs_base", [1.6, 1.7, 1.65])["verdict"] == "missed"
    assert "verdict" not in bench_step.ratio_interval("gathered_vs_dense", [0.9, 1.0])
    assert bench_step.ratio_interval("step_ratio_vs_base", [1.6]) is None
    assert bench_step.ratio_interval("step_ratio_vs_base", [1.6, 0.0]) is None  # no log: no interval, no crash


def test_lm_head_benchmark_times_the_hooked_and_unhooked_head(tmp_path):
    """benchmarks/bench_lm_head.py (tiny head): one row per dtype and batch, ratios that are the quotients of
    the medians it reports, per-round ratios with their interval, and the two heads' logits agreeing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_lm_head

    out = tmp_path / "head.json"
    r = bench_lm_head.main(["--hidden", "16", "--vocab", "64", "--prompt", "5", "--batch", "1", "3", "--rounds", "3",
                            "--dtypes", "float64", "--threads", "1", "--json", str(out), "--markdown", str(tmp_path / "head.md")])
    assert [(row["dtype"], row["batch"]) for row in r["rows"]] == [("float64", 1), ("float64", 3)]
    for row in r["rows"]:
        assert row["contiguous_vs_strided"] == pytest.approx(row["contiguous_ms"] / row["strided_ms"])
        assert len(row["contiguous_vs_strided_per_round"]) == 3
        assert row["intervals"]["contiguous_vs_strided"]["rounds"] == 3
        assert row["max_abs_logit_diff"] < 1e-12  # fp64: the hooked head computes the same logits
    assert json.loads(out.read_text())["rows"][1]["batch"] == 3
    assert "| float64 | 3 |" in (tmp_path / "head.md").read_text()


def test_library_ab_benchmark_runs_the_commits_own_code_beside_the_working_trees(tmp_path, tiny_model_dir,
                                                                                  prepared_data):
    """benchmarks/ab_inference.py, tiny, against HEAD: `old` is HEAD's `mixlora_lit`, imported from its own
    files under another name (the source `git show` gives), not the working tree's package; the ratios are
    the quotients of the medians per round; and where the working tree's library is HEAD's, both pick the
    same tokens and answers."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: nothing to compare against")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ab_inference
    import bench_step

    data_dir, _ = prepared_data
    out = tmp_path / "ab.json"
    path_before = list(sys.path)
    try:
        results = ab_inference.main(["HEAD", "--base", str(tiny_model_dir), "--dtype", "fp32", "--experts", "4", "--rank",
                                     "4", "--gen-batch", "2", "--new-tokens", "3", "--decode-steps", "2", "--limit", "4",
                                     "--eval-batch", "4", "--rounds", "2", "--threads", "1", "--malloc", "default",
                                     "--data-dir", str(data_dir), "--json", str(out)])
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        assert results["old_commit"] == sha
        old = sys.modules[f"mixlora_lit_at_{sha[:10]}.moe"]
        assert Path(old.__file__).parent.parent.name.startswith("ab_inference_")  # the extracted copy, not ours
        assert Path(old.__file__).read_text() == subprocess.run(["git", "show", "HEAD:mixlora_lit/moe.py"], cwd=ROOT,
                                                                capture_output=True, text=True, check=True).stdout
    finally:  # the other library leaves this process's imports
        sys.path[:] = path_before
        for name in [n for n in sys.modules if n.startswith("mixlora_lit_at_")]:
            del sys.modules[name]
    assert results["round_orders"] == [["base", "new", "old"], ["old", "new", "base"], ["base", "new", "old"]]
    for work in ("generate", "decode", "eval"):
        rounds = results["rounds_s"]
        per_round = [n / o for n, o in zip(rounds[f"new_{work}"], rounds[f"old_{work}"], strict=True)]
        assert len(per_round) == 2 and results["per_round"][f"{work}_new_vs_old"] == pytest.approx(per_round)
        assert results["intervals"][f"{work}_new_vs_old"] == bench_step.ratio_interval(f"{work}_new_vs_old",
                                                                                       results["per_round"][f"{work}_new_vs_old"])
    unchanged = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "mixlora_lit"], cwd=ROOT).returncode == 0
    if unchanged:  # always so on a clean checkout (CI)
        assert results["new_same_as_old"] == {"generate": True, "decode": True, "eval": True}
    assert json.loads(out.read_text())["per_round"] == results["per_round"]
