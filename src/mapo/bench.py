"""`make bench`: speed and memory of mapo's fast paths against their plain counterparts, as ratios
measured in one run on one machine (DESIGN §9). Prints a table and writes artifacts/bench/bench.json.

1. Audio-attention capture: SDPA with an indicator value vs eager softmax weights (one layer, fwd+bwd).
2. Scoring: chunked log-probs + entropy from hidden states vs full fp32 [N, T, V] logits (fwd+bwd).
3. Rollout: our decode loop (audio encoded once per prompt, prompt prefilled once per group) vs
   `generate` on the G-times repeated batch, on the tiny model (time, clips through the audio tower).

    python -m mapo.bench [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mapo import paths
from mapo.capture.bench import compare as compare_capture
from mapo.capture.bench import median_time, peak_bytes
from mapo.models.adapter import get_adapter


def bench_scoring(rows: int, tokens: int, hidden: int, vocab: int, device: torch.device, repeats: int) -> dict:
    """Chunked (mapo.scoring.logprobs_from_hidden) vs full-logits log-probs + entropy, forward + backward."""
    from mapo.scoring import logprobs_from_hidden

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    h = torch.randn(rows, tokens + 1, hidden, generator=gen).to(device).requires_grad_()
    ids = torch.randint(vocab, (rows, tokens), generator=gen).to(device)

    def chunked():
        h.grad = None
        lp, ent = logprobs_from_hidden(head, h, ids, 1, chunk_size=512)
        (lp.sum() + ent.sum()).backward()

    def full():
        h.grad = None
        logp = torch.log_softmax(head(h[:, :-1]).float(), -1)
        lp = logp.gather(-1, ids[..., None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        (lp.sum() + ent.sum()).backward()

    out = {}
    for name, step in (("chunked", chunked), ("full", full)):
        out[name] = {"time_s": median_time(step, device, repeats), "peak_bytes": float(peak_bytes(step, device))}
    out["time_ratio"] = out["full"]["time_s"] / out["chunked"]["time_s"]
    out["memory_ratio"] = out["full"]["peak_bytes"] / max(out["chunked"]["peak_bytes"], 1.0)
    return out


def bench_rollout(model_dir: Path, prompts: int, group: int, new_tokens: int, repeats: int) -> dict:
    """Our rollout vs HF generate on the repeated batch, greedy-free sampling with the same settings."""
    from mapo.data.collate import Collator
    from mapo.data.validate import read_manifest
    from mapo.models.loader import generation_suppressed_token_ids, load_model_and_processor
    from mapo.rollout import generate_rollout

    model, processor = load_model_and_processor(model_dir)
    records = read_manifest(paths.SYNTHETIC_DATA_DIR / "test.jsonl").records[:prompts]
    batch = Collator(processor).prompts(records)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id
    suppress = generation_suppressed_token_ids(processor)
    clips = {"n": 0}  # clips the audio tower encodes in one rollout

    def count(module, inputs, output):
        clips["n"] += inputs[0].shape[0]

    hook = get_adapter(model).audio_tower(model).register_forward_hook(count)

    def ours():
        generate_rollout(model, batch, group_size=group, max_new_tokens=new_tokens, eos_token_id=eos,
                         pad_token_id=pad, suppress_token_ids=suppress, seeds=list(range(prompts)))

    repeated = {k: v.repeat_interleave(group, 0) for k, v in batch.items()}

    def hf():
        with torch.no_grad():
            model.generate(**repeated, do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           eos_token_id=eos, pad_token_id=pad, suppress_tokens=suppress)

    out = {}
    for name, step in (("ours", ours), ("hf_generate", hf)):
        clips["n"] = 0
        step()
        out[name] = {"clips_encoded_per_rollout": clips["n"], "time_s": median_time(step, torch.device("cpu"), repeats)}
    hook.remove()
    out["time_ratio"] = out["hf_generate"]["time_s"] / out["ours"]["time_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    seq = 1024 if args.quick or device.type == "cpu" else 4096
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"}
    cap = compare_capture(seq, repeats=2 if args.quick else 3)
    results["capture"] = {"seq_len": seq, **cap}
    vocab = 32_000 if device.type == "cpu" else 152_064
    results["scoring"] = {"rows": 8, "tokens": 256, "vocab": vocab, **bench_scoring(8, 256, 256, vocab, device, 2)}
    if (paths.TINY_MODEL_DIR / "config.json").is_file() and (paths.SYNTHETIC_DATA_DIR / "test.jsonl").is_file():
        results["rollout"] = {"prompts": 4, "group": 8, "new_tokens": 24, **bench_rollout(paths.TINY_MODEL_DIR, 4, 8, 24, 2)}
    else:
        results["rollout"] = "skipped: run `make tiny` first"
    out = paths.ARTIFACTS / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"device: {results['device']}")
    print(f"{'what':<44}{'time ratio':>12}{'memory ratio':>14}")
    print(f"{'capture: eager / sdpa-indicator (S=%d)' % seq:<44}{cap['time_ratio']:>12.2f}{cap['memory_ratio']:>14.1f}")
    sc = results["scoring"]
    print(f"{'scoring: full logits / chunked (V=%d)' % vocab:<44}{sc['time_ratio']:>12.2f}{sc['memory_ratio']:>14.1f}")
    if isinstance(results["rollout"], dict):
        ro = results["rollout"]
        print(f"{'rollout: HF generate ×G / encode+prefill once':<44}{ro['time_ratio']:>12.2f}{'':>14}")
        print(f"  clips through the audio tower per rollout of {ro['prompts']} prompts x G={ro['group']}: "
              f"ours {ro['ours']['clips_encoded_per_rollout']}, generate {ro['hf_generate']['clips_encoded_per_rollout']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
