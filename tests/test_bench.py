"""`make bench` plumbing: the GPU suite's code path at toy widths on CPU (bandwidth bound and MFU arithmetic,
JSON and README table), the card table, and the CPU suite's table with its target marks."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mapo import bench, bench_gpu
from mapo.capture.bench import paired_ratio


def test_card_peaks_table():
    assert bench_gpu.card_peaks("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert bench_gpu.card_peaks("NVIDIA H100 PCIe") == (2.0e12, 756e12)
    assert bench_gpu.card_peaks("NVIDIA H200") == (4.8e12, 989e12)
    assert bench_gpu.card_peaks("Some Future GPU") == (None, None)


def test_gpu_suite_runs_at_toy_widths_on_cpu(tmp_path):
    torch.set_num_threads(1)
    bench.main(["--suite", "gpu7b", "--toy", "--bandwidth-tbs", "0.01", "--peak-tflops", "0.1", "--out", str(tmp_path)])
    results = json.loads(next(tmp_path.glob("*-gpu7b.json")).read_text())
    sections = results["sections"]
    assert all(isinstance(v, dict) for v in sections.values()), sections  # nothing failed or skipped
    table = (tmp_path / "README.md").read_text()
    # Hand count of the toy decoder's weights read per step (fp32): per layer q 64·64+64, k and v 64·32+32 each
    # (2 KV heads × 16), o 64·64, MLP 3·64·128, two norms 2·64; then the final norm 64 and the LM head 512·64.
    per_layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    weights = 4 * (2 * per_layer + 64 + 512 * 64)
    assert results["weight_bytes_per_step"] == weights
    decode = sections["decode_64rows_graph"]
    # KV per token and row: 2 (K, V) × 2 layers × 2 heads × 16 × 4 bytes = 512; mean context 32 + 12/2.
    assert decode["kv_bytes_mean"] == 512 * 64 * (32 + decode["new_tokens"] / 2)
    assert decode["bound_s"] == pytest.approx((weights + decode["kv_bytes_mean"]) / 0.01e12)
    assert decode["step_over_bound"] == pytest.approx(decode["step_s"] / decode["bound_s"])
    assert decode["graphs"] == {"captured": 0, "replayed": 0, "failed": 0}  # no CUDA graph on CPU
    assert len(decode["step_s_rounds"]) == 3 and decode["step_s"] == sorted(decode["step_s_rounds"])[1]  # median
    for rows in (64, 32, 128):  # rollout.compile, traced by dynamo's "eager" backend at toy widths
        compiled = sections[f"decode_{rows}rows_graph_compiled"]
        assert compiled["compile_decoder"] == "eager" and compiled["rows"] == rows and compiled["warmup_s"] > 0
    assert "| decode_64rows_graph_compiled | 64 rows, prompt 32, 12 tokens, compiled (warm-up " in table
    # the shared-prompt cache reads each of the 8 prompts once: 512 · (8 · 32 + 64 · new / 2)
    shared = sections["decode_64rows_graph_shared_prompt"]
    assert shared["shared_prompt"] and shared["kv_bytes_mean"] == 512 * (8 * 32 + 64 * shared["new_tokens"] / 2)
    update = sections["update_2x64"]
    assert update["params_counted"] == 2 * per_layer + 512 * 64  # decoder layers and LM head (no final norm)
    assert update["mfu"] == pytest.approx(6 * update["params_counted"] * 128 / update["time_s"] / 0.1e12)
    assert sections["update_8x64_checkpointed"]["checkpointing"] is True
    # The profile's categories add up to its total, and every step runs a matmul (the decoder and LM head).
    profile = sections["decode_profile"]
    assert profile["measure"] == "cpu ops" and profile["new_tokens"] == 6
    assert sum(profile["per_step_s"].values()) == pytest.approx(profile["total_s"])
    # Which categories appear, not how long they took (CPU op times under load can make full − one ≤ 0;
    # the subtraction itself is checked by hand in test_per_step_categories_subtract_the_one_token_profile).
    assert "matmul" in profile["per_step_s"] and all(v >= 0 for v in profile["per_step_s"].values())
    assert not profile["share"] or sum(profile["share"].values()) == pytest.approx(1.0)
    assert profile["total_over_bound"] == pytest.approx(profile["total_s"] / profile["bound_s"])
    assert "| decode_profile | 64 rows, eager, cpu ops per step: " in table
    assert "gpu7b suite (toy widths)" in table and "| decode_64rows_eager |" in table and "MFU" in table
    overhead = sections["capture_overhead"]
    assert overhead["fused_vs_sdpa_max_abs_diff"] < 1e-5 and overhead["fused_output_max_abs_diff"] < 1e-5
    assert f"fused **{overhead['fused_over_none']:.2f}×**" in table


def test_kernel_categories():
    assert bench_gpu.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert bench_gpu.kernel_category("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention"
    assert bench_gpu.kernel_category("void at::native::sbtopk::gatherTopK<float>") == "sampling"
    assert bench_gpu.kernel_category("Memcpy DtoD (Device -> Device)") == "copy"
    assert bench_gpu.kernel_category("aten::mm") == "matmul"
    assert bench_gpu.kernel_category("void at::native::vectorized_elementwise_kernel<4, rsqrt>") == "other"


def test_cpu_table_marks_targets(tmp_path):
    results = {
        "machine": "cpu-test-1t", "device": "test CPU", "torch": "x", "transformers": "y", "date": "today",
        "command": "python -m mapo.bench", "wall_s": 1.0,
        "scoring": {"rows": 8, "tokens": 128, "vocab": 32000, "speed": 1.3, "memory": 0.05},
        "scoring_bf16": {"rows": 2, "tokens": 128, "hidden": 256, "vocab": 32000, "memory": 0.31},
        "step": {"rows": 64, "sequence_length": 188, "mapo": {"time_s": 1.3}, "grpo": {"time_s": 1.0}},
        "capture_overhead": {"setting": "16 rows", "sdpa_over_none": 2.25, "fused_over_none": 1.125},
        "rollout_audio": {"prompts": 8, "group": 8, "new_tokens": 40, "temperature": 1.3, "speedup_vs_generate": 3.2,
                          "static_over_dynamic_speed": 1.2, "shared_over_per_row_speed": 1.04},
        "trl": "skipped: TRL is not installed",
    }
    table = bench.markdown_table(results)
    assert "| scoring speed: full logits time / fused chunked time | 1.30 | met (>= 0.9) |" in table
    assert "| scoring memory: fused chunked peak / full logits peak | 0.05 | met (<= 0.25) |" in table
    assert "| step after the rollout: MAPO / GRPO (same rollout) | 1.30 | MISSED (<= 1.15) |" in table  # old files
    paired = bench.markdown_table({**results, "step": {**results["step"], "mapo_over_grpo": 1.1}})
    assert "| step after the rollout: MAPO / GRPO (same rollout) | 1.10 | met (<= 1.15) |" in paired
    assert ("| scoring memory, bf16 head (as on a GPU): fused chunked peak / full logits peak | 0.31 | MISSED (<= 0.25) "
            "| 2×128 positions, H = 256, V = 32,000, fwd+bwd; speed not measured (CPU bf16 matmuls) |") in table
    assert "| trl | – | – | skipped: TRL is not installed |" in table
    assert "| rollout (audio prompts): generate on the G-repeated batch / ours | 3.20 | met (>= 3) |" in table
    assert "| rollout (audio): per-row prompt cache / shared prompt cache | 1.04 |  |" in table
    assert ("| captured layer: mass fused into the layer's call / no capture | 1.12 |  | one layer's attention, "
            "fwd+bwd, 16 rows |") in table
    (tmp_path / "cpu-test-1t.json").write_text(json.dumps(results))
    (tmp_path / "README.md").write_text("# notes kept\n")
    bench.write_readme(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# notes kept") and "### cpu-test-1t" in text
    bench.write_readme(tmp_path)  # rewriting keeps one copy of the tables
    assert (tmp_path / "README.md").read_text().count("### cpu-test-1t") == 1


def test_scoring_memory_only():
    """repeats = 0: peak memory of both sides, no timing; the fused chunks hold far less than full logits."""
    out = bench.bench_scoring(2, 32, 16, 2000, torch.device("cpu"), 0, chunk_size=8)
    assert "speed" not in out and "time_s" not in out["full"]
    assert out["full"]["peak_bytes"] > 0 and 0 < out["memory"] < 0.25
    # chunk_size is taken: one chunk of all 64 positions holds several times the memory of 8-position chunks
    whole = bench.bench_scoring(2, 32, 16, 2000, torch.device("cpu"), 0, chunk_size=64)
    assert whole["memory"] > 2 * out["memory"]


def _counting_sdpa(monkeypatch):
    """Wrap the registry's "sdpa" entry so every call that reaches it records its query length: entered
    before `matmul_decode_attention`, it is what the experiment falls back to."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    real = ALL_ATTENTION_FUNCTIONS["sdpa"]
    reached: list[int] = []

    def counting(module, query, *args, **kwargs):
        reached.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", counting)
    return real, counting, reached


def test_matmul_decode_attention_equals_sdpa_and_is_removed_after(monkeypatch):
    """The decode-attention experiment of the GPU suite: the same greedy tokens as SDPA on a GQA toy decoder
    with left-padded prompts; inside it only the prefill reaches SDPA (every one-query step takes the matmul
    path), and the registry is as it was afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mapo.rollout import generate_rollout

    torch.manual_seed(0)
    model = bench_gpu.build_model(bench_gpu.WIDTHS_TOY, torch.device("cpu"), torch.float32)
    ids = torch.randint(10, 500, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the decode mask blocks those keys

    def rollout():
        return generate_rollout(model, {"input_ids": ids, "attention_mask": mask}, group_size=2, max_new_tokens=6,
                                eos_token_id=510, pad_token_id=0, do_sample=False)

    _, counting, reached = _counting_sdpa(monkeypatch)
    expected = rollout()
    assert reached.count(1) == 2 * (expected.completion_ids.shape[1] - 1)  # without it, SDPA decodes
    reached.clear()
    with bench_gpu.matmul_decode_attention():
        got = rollout()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is counting
    assert torch.equal(got.completion_ids, expected.completion_ids) and got.completion_ids.shape[1] > 1
    assert reached == [9, 9]  # the prefill of each layer; no decode step fell back


def test_matmul_decode_attention_values(monkeypatch):
    """One decode call against SDPA itself: GQA (4 query heads on 2 KV heads), blocked keys, a custom scale;
    the call is answered by the matmul path (it never reaches SDPA)."""
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, h, n, 16, generator=gen) for h, n in ((4, 1), (2, 7), (2, 7)))
    allowed = torch.rand(3, 1, 1, 7, generator=gen) > 0.3
    allowed[..., -1] = True
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    sdpa, _, reached = _counting_sdpa(monkeypatch)
    expected, _ = sdpa(module, query, key, value, allowed, scaling=0.3)
    with bench_gpu.matmul_decode_attention() as attention:
        got, _ = attention(module, query, key, value, allowed, scaling=0.3)
    assert reached == []
    assert got.shape == expected.shape == (3, 1, 4, 16)
    assert torch.allclose(got, expected, atol=1e-5)
    masked_out, _ = sdpa(module, query, key, value, torch.ones_like(allowed), scaling=0.3)
    assert not torch.allclose(masked_out, expected, atol=1e-3)  # the blocked keys matter here


def test_per_step_categories_subtract_the_one_token_profile():
    """Hand-worked: full − one per category over the 5 steps between a 1-token and a 6-token rollout; a
    category that shrank (noise) counts 0, one seen only in the long run counts whole."""
    one = {"matmul": 1.0, "other": 0.5}
    full = {"matmul": 6.0, "other": 0.4, "attention": 2.0}
    assert bench_gpu.per_step_categories(one, full, 6) == {"attention": 0.4, "matmul": 1.0, "other": 0.0}
    assert bench_gpu.per_step_categories(one, full, 1) == {"attention": 2.0, "matmul": 5.0, "other": 0.0}


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # Rounds 1-2 ran busy (both slow), 3-5 quiet. Per round mapo/grpo = 1.2 (1.25 in round 4): median 1.2.
    # The ratio of the medians pairs the quiet GRPO median with a busy MAPO one: 0.48 / 0.2 = 2.4.
    grpo = [0.40, 0.40, 0.20, 0.20, 0.20]
    mapo = [0.48, 0.48, 0.24, 0.25, 0.24]
    assert paired_ratio(mapo, grpo) == pytest.approx(1.2)
    assert statistics.median(mapo) / statistics.median(grpo) == pytest.approx(1.25)
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_ratio([], [])


def test_trl_speedup_is_the_median_of_per_round_block_ratios(monkeypatch):
    # mapo blocks (after one warm-up step) have medians 0.3, 0.6, 0.3; TRL blocks 0.6, 0.9, 0.75:
    # per round 2.0, 1.5, 2.5 -> 2.0.
    from mapo import bench_trl

    mapo_blocks = iter([[9.0, 0.3, 0.2, 0.4], [9.0, 0.6, 0.6, 0.6], [9.0, 0.3, 0.3, 0.3]])
    trl_blocks = iter([0.6, 0.9, 0.75])

    class Harness:
        cfg = SimpleNamespace(reward=SimpleNamespace(functions=["accuracy"], weights=[1.0]))

        def text_only_records(self, n):
            return list(range(n))

        def run_steps(self, n):
            times = next(mapo_blocks)
            assert len(times) == n
            return times, {"rollout": times}

    monkeypatch.setattr(bench_trl, "mapo_harness", lambda *a, **k: Harness())
    monkeypatch.setattr(bench_trl, "time_trl_grpo", lambda *a, steps, **k: {"times_s": [next(trl_blocks)] * steps})
    out = bench_trl.compare(Path("m"), Path("d"), steps=3, warmup=1, rounds=3)
    assert out["per_round"] == pytest.approx([2.0, 1.5, 2.5]) and out["speedup"] == pytest.approx(2.0)
    assert out["mapo"]["times_s"] == [0.3, 0.2, 0.4, 0.6, 0.6, 0.6, 0.3, 0.3, 0.3]  # warm-up steps left out
