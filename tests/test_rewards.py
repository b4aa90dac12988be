"""Reward functions: hand-written completions with the expected score, batch weighting, registry errors."""

from __future__ import annotations

import pytest
import torch

from mapo.data.prompt import ANSWER_CLOSE, ANSWER_OPEN, option_letter, reference_completion
from mapo.data.schema import Record
from mapo.rewards import (
    REWARDS,
    UnknownRewardError,
    accuracy_reward,
    compute_rewards,
    extract_answer,
    format_reward,
    get_reward_fns,
    match_choice,
    predicted_choice,
    register_reward,
)

torch.set_num_threads(1)

PITCH = Record(id="p1", audio=None, question="Is the second tone higher or lower?", choices=["higher", "lower"], answer="lower")
COUNT = Record(id="c1", audio=None, question="How many beeps?", choices=["1", "10", "2", "3"], answer="1")
COUNT_10 = Record(id="c2", audio=None, question="How many beeps?", choices=["1", "10", "2", "3"], answer="10")
CAFE = Record(id="u1", audio=None, question="Which word is spoken?", choices=["Café au lait", "ÉCOLE"], answer="Café au lait")
# Option texts that look like letters of other options: text must win over letter.
LETTERY = Record(id="l1", audio=None, question="Which label?", choices=["B", "A"], answer="A")
SENTENCE = Record(id="s1", audio=None, question="What happens?", choices=["A dog barks.", "A car passes."], answer="A car passes.")


def tagged(answer: str, reasoning: str = "The second tone is lower.") -> str:
    return f"{reasoning} {ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


# --------------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------------

ACCURACY_CASES = [
    # (completion, record, expected accuracy, why)
    (tagged("lower"), PITCH, 1.0, "option text"),
    (tagged("higher"), PITCH, 0.0, "wrong option text"),
    (tagged("B"), PITCH, 1.0, "letter"),
    (tagged("(B)"), PITCH, 1.0, "letter in parentheses, as the prompt shows it"),
    (tagged(" b "), PITCH, 1.0, "lower-case letter with spaces"),
    (tagged("B)"), PITCH, 1.0, "letter with closing parenthesis"),
    (tagged("B."), PITCH, 1.0, "letter with period"),
    (tagged("A"), PITCH, 0.0, "wrong letter"),
    (tagged("C"), PITCH, 0.0, "letter past the last option"),
    (tagged("(B) lower"), PITCH, 1.0, "letter and text as in the prompt"),
    (tagged("b) LOWER"), PITCH, 1.0, "letter and text, other punctuation and case"),
    (tagged("B: lower"), PITCH, 1.0, "letter, colon, text"),
    (tagged("(A) lower"), PITCH, 0.0, "letter and text disagree"),
    (tagged("(B) higher"), PITCH, 0.0, "letter and text disagree the other way"),
    (tagged("  LoWeR  "), PITCH, 1.0, "case and outer spaces"),
    (tagged("lower."), PITCH, 1.0, "trailing period"),
    (tagged("\nlower\n"), PITCH, 1.0, "newlines around the answer"),
    (tagged("lower or higher"), PITCH, 0.0, "hedging inside one tag"),
    (tagged("A B"), PITCH, 0.0, "two letters"),
    (tagged("the answer is lower"), PITCH, 0.0, "extra words: only the whole text counts"),
    (tagged("(B"), PITCH, 0.0, "unbalanced parenthesis"),
    (tagged(""), PITCH, 0.0, "empty answer"),
    (tagged("   "), PITCH, 0.0, "blank answer"),
    ("", PITCH, 0.0, "empty completion"),
    ("lower", PITCH, 0.0, "no tag at all"),
    ("reasoning <answer>low", PITCH, 0.0, "truncated inside the answer"),
    ("reasoning <answer>lower</ans", PITCH, 0.0, "truncated inside the closing tag"),
    ("reasoning lower</answer>", PITCH, 0.0, "closing tag without opening tag"),
    ("<answer>lower</answer>", PITCH, 1.0, "no reasoning: accuracy does not care (format does)"),
    ("\x00\x01 ��� <<<>>> </answer><answer", PITCH, 0.0, "garbage"),
    (tagged("higher") + " " + tagged("lower"), PITCH, 1.0, "two tags: the last one counts"),
    (tagged("lower") + " " + tagged("higher"), PITCH, 0.0, "two tags: the last one counts (wrong)"),
    (tagged("lower") + " then <answer>hig", PITCH, 1.0, "last COMPLETE tag counts, truncated one ignored"),
    ("<answer><answer>lower</answer></answer>", PITCH, 1.0, "nested: the innermost pair is read"),
    ("<answer>higher <answer>lower</answer>", PITCH, 1.0, "stray opening tag before the pair"),
    ("<answer>lower</answer> x </answer>", PITCH, 1.0, "stray closing tag after the pair"),
    (tagged("1"), COUNT, 1.0, "'1' is an option"),
    (tagged("10"), COUNT, 0.0, "'10' is another option, not a superstring match of '1'"),
    (tagged("10"), COUNT_10, 1.0, "'10' matches '10' exactly"),
    (tagged("1"), COUNT_10, 0.0, "'1' does not match '10' (substring)"),
    (tagged("B"), COUNT_10, 1.0, "letter B is '10'"),
    (tagged("(A) 1"), COUNT, 1.0, "letter and numeric text"),
    (tagged("café au lait"), CAFE, 1.0, "unicode, case-folded"),
    (tagged("CAFE\u0301 AU LAIT"), CAFE, 1.0, "decomposed accent (e + U+0301) equals the composed one"),
    (tagged("cafe au lait"), CAFE, 0.0, "accent removed is a different text"),
    (tagged("\uff21"), CAFE, 1.0, "full-width letter A"),
    (tagged("café\u00a0au  lait"), CAFE, 1.0, "no-break space and double space"),
    (tagged("école"), CAFE, 0.0, "the other unicode option"),
    (tagged("A"), LETTERY, 1.0, "'A' is option 2's text (text wins over letter A = 'B')"),
    (tagged("B"), LETTERY, 0.0, "'B' is option 1's text, not letter B"),
    (tagged("(B)"), LETTERY, 1.0, "'(B)' is not an option text, so it is letter B = 'A'"),
    (tagged("a car passes"), SENTENCE, 1.0, "sentence option without its period"),
    (tagged("A car passes."), SENTENCE, 1.0, "sentence option verbatim"),
    (tagged("(B) A car passes."), SENTENCE, 1.0, "letter and sentence"),
    (tagged("A"), SENTENCE, 0.0, "letter A is the wrong sentence"),
]


@pytest.mark.parametrize("completion, record, expected, why", ACCURACY_CASES, ids=[c[3] for c in ACCURACY_CASES])
def test_accuracy_cases(completion, record, expected, why):
    assert accuracy_reward(completion, record) == expected, why


def test_option_text_wins_over_letter():
    # choices ["B", "A"]: "A" is the text of index 1 (letter A would be index 0); "(A)" is only a letter.
    assert match_choice("A", LETTERY.choices) == 1
    assert match_choice("B", LETTERY.choices) == 0
    assert match_choice("(A)", LETTERY.choices) == 0


def test_letters_follow_the_prompt_letters():
    # The parser's letters must be the prompt's letters: option_letter(i) names option i.
    choices = [f"option {i}" for i in range(6)]
    for i in range(6):
        assert match_choice(option_letter(i), choices) == i
        assert match_choice(f"({option_letter(i)}) option {i}", choices) == i


def test_reference_completion_scores_full():
    # The warm-start target must get both rewards: the prompt module and the rewards agree.
    record = Record(id="r", audio=None, question="q", choices=["higher", "lower"], answer="lower", trace="Tone 2 is lower.")
    target = reference_completion(record)
    assert accuracy_reward(target, record) == 1.0
    assert format_reward(target, record) == 1.0


def test_extract_and_predict():
    assert extract_answer("a <answer> x </answer> b <answer>y</answer>") == "y"
    assert extract_answer("a <answer>y") is None
    assert extract_answer("") is None
    assert predicted_choice(tagged("(B)"), ["higher", "lower"]) == 1
    assert predicted_choice(tagged("maybe"), ["higher", "lower"]) is None
    assert predicted_choice("no tag", ["higher", "lower"]) is None


def test_long_garbage_is_fast_and_zero():
    # A 200k-character run of tags and text must not blow up the regex (linear scan) and must score 0.
    garbage = ("<answer" + "x" * 50 + "</" * 10) * 2000
    assert accuracy_reward(garbage, PITCH) == 0.0
    assert format_reward(garbage, PITCH) == 0.0


def test_non_text_completion_is_a_type_error():
    with pytest.raises(TypeError, match="str"):
        accuracy_reward(None, PITCH)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str"):
        format_reward(b"<answer>B</answer>", PITCH)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------------

FORMAT_CASES = [
    (tagged("lower"), 1.0, "reasoning then one tag"),
    (tagged("higher"), 1.0, "format ignores correctness"),
    (tagged("lower") + "  \n", 1.0, "trailing whitespace is fine"),
    ("Reasoning.\n\n<answer>\n(B)\n</answer>\n", 1.0, "multi-line"),
    ("<answer>lower</answer>", 0.0, "no reasoning"),
    ("   \n<answer>lower</answer>", 0.0, "blank reasoning"),
    (tagged(""), 0.0, "empty answer"),
    (tagged("  "), 0.0, "blank answer"),
    (tagged("lower") + " done.", 0.0, "text after the tag"),
    (tagged("higher") + " " + tagged("lower"), 0.0, "two tags"),
    ("reasoning <answer>lower", 0.0, "truncated: no closing tag"),
    ("reasoning </answer>lower<answer>", 0.0, "tags in the wrong order"),
    ("reasoning <answer><answer>lower</answer></answer>", 0.0, "nested tags"),
    ("reasoning <answer>lower</answer></answer>", 0.0, "extra closing tag"),
    ("reasoning lower", 0.0, "no tag"),
    ("", 0.0, "empty"),
    ("razonamiento — ñ 🎵 <answer>lower</answer>", 1.0, "unicode reasoning"),
]


@pytest.mark.parametrize("completion, expected, why", FORMAT_CASES, ids=[c[2] for c in FORMAT_CASES])
def test_format_cases(completion, expected, why):
    assert format_reward(completion, PITCH) == expected, why


# --------------------------------------------------------------------------------------------------
# batch scoring and registry
# --------------------------------------------------------------------------------------------------


def test_compute_rewards_weighted_total_and_per_function():
    # Two prompts, G = 2 samples each: records repeated per group.
    records = [PITCH, PITCH, COUNT, COUNT]
    completions = [
        tagged("lower"),  # accuracy 1, format 1
        "<answer>lower</answer>",  # accuracy 1, format 0 (no reasoning)
        tagged("10") + " extra",  # accuracy 0, format 0
        tagged("(A)"),  # accuracy 1, format 1
    ]
    result = compute_rewards(completions, records, ["accuracy", "format"], weights=[1.0, 0.5])
    assert torch.equal(result.per_function["accuracy"], torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert torch.equal(result.per_function["format"], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # total = 1.0 * acc + 0.5 * fmt = [1 + 0.5, 1 + 0, 0 + 0, 1 + 0.5]
    assert torch.equal(result.total, torch.tensor([1.5, 1.0, 0.0, 1.5]))
    assert result.total.dtype == torch.float32 and result.total.shape == (4,)
    assert torch.equal(result.accuracy, result.per_function["accuracy"])
    assert result.weights == {"accuracy": 1.0, "format": 0.5}
    # means: accuracy 3/4, format 2/4, total (1.5 + 1 + 0 + 1.5) / 4 = 1.0
    assert result.means() == {"reward/accuracy": 0.75, "reward/format": 0.5, "reward/total": 1.0}


def test_compute_rewards_mapping_weights_and_default_weights():
    records = [PITCH, PITCH]
    completions = [tagged("lower"), tagged("higher")]
    by_map = compute_rewards(completions, records, ["accuracy", "format"], weights={"format": 0.25, "accuracy": 2.0})
    # [2*1 + 0.25*1, 2*0 + 0.25*1]
    assert torch.equal(by_map.total, torch.tensor([2.25, 0.25]))
    default = compute_rewards(completions, records, ["accuracy", "format"])
    assert torch.equal(default.total, torch.tensor([2.0, 1.0]))
    # Weight 0 keeps accuracy for the MAPO gate without shaping the reward.
    gate_only = compute_rewards(completions, records, ["format", "accuracy"], weights=[1.0, 0.0])
    assert torch.equal(gate_only.total, torch.tensor([1.0, 1.0]))
    assert torch.equal(gate_only.accuracy, torch.tensor([1.0, 0.0]))


def test_compute_rewards_empty_batch():
    result = compute_rewards([], [], ["accuracy"])
    assert result.total.shape == (0,) and result.accuracy.shape == (0,)


def test_accuracy_missing_is_a_clear_error():
    result = compute_rewards([tagged("lower")], [PITCH], ["format"])
    with pytest.raises(KeyError, match="accuracy"):
        _ = result.accuracy


def test_bad_batches_raise():
    with pytest.raises(ValueError, match="align"):
        compute_rewards([tagged("lower")], [PITCH, PITCH], ["accuracy"])
    with pytest.raises(ValueError, match="at least one"):
        compute_rewards([tagged("lower")], [PITCH], [])
    with pytest.raises(ValueError, match="unique"):
        compute_rewards([tagged("lower")], [PITCH], ["accuracy", "accuracy"])
    with pytest.raises(ValueError, match="2 reward functions"):
        compute_rewards([tagged("lower")], [PITCH], ["accuracy", "format"], weights=[1.0])
    with pytest.raises(ValueError, match="exactly"):
        compute_rewards([tagged("lower")], [PITCH], ["accuracy", "format"], weights={"accuracy": 1.0})


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownRewardError) as info:
        get_reward_fns(["accuracy", "acuracy"])
    message = str(info.value)
    assert "'acuracy'" in message and "accuracy" in message and "format" in message
    # Callers may catch either error type.
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError, match="valid: .*format"):
        compute_rewards([tagged("lower")], [PITCH], ["nope"])


def test_register_reward_adds_and_rejects_duplicates():
    name = "_test_length"
    try:

        @register_reward(name)
        def length_reward(completion: str, record: Record) -> float:
            return len(completion) / 10.0

        assert get_reward_fns([name]) == [length_reward]
        result = compute_rewards(["abcde", "a"], [PITCH, PITCH], [name, "format"], weights=[2.0, 1.0])
        # 2 * len/10 + format(0) = [2 * 0.5, 2 * 0.1]
        assert torch.allclose(result.total, torch.tensor([1.0, 0.2]))
        with pytest.raises(ValueError, match="already registered"):
            register_reward(name)(length_reward)
    finally:
        REWARDS.pop(name, None)


def test_non_finite_reward_scores_zero_and_is_counted(caplog):
    name = "_test_nan"
    try:
        register_reward(name)(lambda completion, record: float("nan") if completion == "x" else 0.5)
        with caplog.at_level("WARNING", logger="mapo.rewards"):
            result = compute_rewards(["x", "y"], [PITCH, PITCH], [name])
        assert result.per_function[name].tolist() == [0.0, 0.5] and result.errors == {name: 1}
        assert f"reward '{name}' returned nan on record 'p1'" in caplog.text
    finally:
        REWARDS.pop(name, None)
