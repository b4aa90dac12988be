"""Same work as TRL's `GRPOTrainer`, timed in the same process (`make bench` runs it when TRL is installed:
`pip install -e .[bench]`).

The setting (issue 10): the tiny model, text-only prompts, 8 prompts × G = 8 completions, 40 new tokens,
temperature 1.3, β = 0 (no reference model), one optimizer step per generation, micro-batches of 16 rows,
rewards = mapo's reward functions. TRL gets the same text decoder and LM head as a `Qwen2ForCausalLM` (a
text-only prompt never touches the audio tower, so the computation is the same) and the same prompt token
ids (the chat-templated prompt text, which TRL tokenises with the same tokenizer).

Both sides run their own loop; a step is one optimizer step including generation, rewards and the update.
They run in alternating blocks (mapo, TRL, mapo, TRL) so that load changes on a shared machine hit both;
each block's first step is warm-up; the reported time per step is the median of the timed ones.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from mapo.capture.bench import paired_ratio

MICRO_BATCH = 16


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def text_only_lm(model):
    """A `Qwen2ForCausalLM` holding `model`'s text decoder and LM head (same weights, copied)."""
    from transformers import Qwen2ForCausalLM

    from mapo.models.adapter import get_adapter

    adapter = get_adapter(model)
    text = adapter.text_model(model)
    lm = Qwen2ForCausalLM(text.config)
    state = {f"model.{k}": v for k, v in text.state_dict().items()}
    state.update({f"lm_head.{k}": v for k, v in adapter.lm_head(model).state_dict().items()})
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"text-only copy: missing {missing}, unexpected {unexpected}")
    return lm.float().train()


def time_trl_grpo(model_dir: Path, records, *, prompts: int, group: int, new_tokens: int, temperature: float,
                  steps: int, warmup: int, reward_functions, reward_weights, seed: int = 0) -> dict:
    """Median seconds per TRL GRPO optimizer step on `prompts` text-only records per step."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mapo.data import prompt
    from mapo.models.loader import generation_suppressed_token_ids, load_model_and_processor
    from mapo.rewards import compute_rewards

    model, processor = load_model_and_processor(model_dir)
    tokenizer = processor.tokenizer
    lm = text_only_lm(model)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    lm.generation_config.eos_token_id = im_end
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    texts = [tokenizer.apply_chat_template(prompt.messages(r), tokenize=False, add_generation_prompt=True)
             for r in records]
    dataset = Dataset.from_dict({"prompt": texts, "row": list(range(len(records)))})

    def reward(prompts, completions, row, **_):
        return compute_rewards(list(completions), [records[i] for i in row], reward_functions, reward_weights).total.tolist()

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    rows = prompts * group
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=rows // MICRO_BATCH,
            num_generations=group, max_completion_length=new_tokens, temperature=temperature, top_p=1.0, top_k=0,
            beta=0.0, num_iterations=1, learning_rate=1e-6, max_steps=warmup + steps, logging_steps=10_000,
            save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False, seed=seed,
            dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False, gradient_checkpointing=False,
            generation_kwargs={"suppress_tokens": generation_suppressed_token_ids(processor)},
        )
        trainer = GRPOTrainer(model=lm, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()
    timed = times[warmup:]
    return {"time_s": statistics.median(timed), "times_s": timed, "steps": len(timed)}


def mapo_harness(model_dir: Path, data_dir: Path, *, prompts: int, group: int, new_tokens: int, temperature: float,
                 seed: int = 0):
    """mapo's RL step (`mapo.rl.rl_step`, algo=grpo, β = 0) in the comparison's setting."""
    from mapo.bench_rl import RLHarness

    return RLHarness(model_dir, data_dir, algo="grpo", overrides=[
        "algo.beta=0", "data.text_only_fraction=1.0", f"rollout.prompts_per_step={prompts}",
        f"rollout.group_size={group}", f"rollout.max_new_tokens={new_tokens}", f"rollout.temperature={temperature}",
        f"trainer.micro_batch_size={MICRO_BATCH}", "trainer.lr=1e-6", f"trainer.seed={seed}",
    ])


def compare(model_dir: Path, data_dir: Path, *, steps: int = 4, warmup: int = 1, rounds: int = 2) -> dict:
    """{"mapo": ..., "trl": ..., "speedup": TRL s/step ÷ mapo s/step} in the issue's setting.

    The two run in alternating blocks (mapo, TRL, mapo, TRL, …; `rounds` of each, `steps` timed steps per
    block after `warmup` untimed ones), so a change of machine load during the run hits both; "speedup" is the
    median over rounds of the ratio of the two blocks' medians (`paired_ratio`), "per_round" those ratios.
    """
    setting = dict(prompts=8, group=8, new_tokens=40, temperature=1.3)
    torch.manual_seed(0)
    harness = mapo_harness(model_dir, data_dir, **setting)
    cfg = harness.cfg  # the same rewards on both sides
    records = harness.text_only_records(setting["prompts"] * (warmup + steps))
    mapo_times: list[float] = []
    trl_times: list[float] = []
    block_medians: dict[str, list[float]] = {"mapo": [], "trl": []}
    phases: dict[str, list[float]] = {}
    for _ in range(rounds):
        times, block_phases = harness.run_steps(warmup + steps)
        mapo_times += times[warmup:]
        block_medians["mapo"].append(statistics.median(times[warmup:]))
        for key, values in block_phases.items():
            phases.setdefault(key, []).extend(values[warmup:])
        trl = time_trl_grpo(model_dir, records, steps=steps, warmup=warmup, reward_functions=list(cfg.reward.functions),
                            reward_weights=list(cfg.reward.weights), **setting)
        trl_times += trl["times_s"]
        block_medians["trl"].append(statistics.median(trl["times_s"]))
    mapo = {"time_s": statistics.median(mapo_times), "times_s": mapo_times,
            "phases": {k: statistics.median(v) for k, v in phases.items()}}
    trl = {"time_s": statistics.median(trl_times), "times_s": trl_times}
    return {"setting": {**setting, "beta": 0.0, "micro_batch": MICRO_BATCH, "steps": steps, "warmup": warmup,
                        "rounds": rounds}, "mapo": mapo, "trl": trl,
            "per_round": [t / m for t, m in zip(block_medians["trl"], block_medians["mapo"])],
            "speedup": paired_ratio(block_medians["trl"], block_medians["mapo"])}
