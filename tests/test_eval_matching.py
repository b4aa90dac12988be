"""Benchmark answer matching, worked by hand from the rules in mapo.eval.matching's docstring."""

from __future__ import annotations

import pytest

from mapo.eval.matching import (
    benchmark_choice,
    benchmark_correct,
    benchmark_tokens,
    extract_prediction,
    incorrect_tokens,
    match_answer_to_choice,
)
from mapo.rewards import predicted_choice

CHOICES = ["Dog barking", "Car horn", "Rain", "Applause"]


def test_tokens_are_lower_cased_word_sets():
    assert benchmark_tokens("The Dog's bark, the DOG!") == {"the", "dog", "s", "bark"}
    assert benchmark_tokens("  ...  ") == set()
    assert benchmark_tokens("3.5 kHz") == {"3", "5", "khz"}
    assert benchmark_tokens("über_cool café") == {"über_cool", "café"}  # \w is Unicode-aware, "_" is a word char


def test_prediction_is_the_last_answer_tag_else_the_whole_output():
    assert extract_prediction("I think <answer>Rain</answer> no wait <answer>Car horn</answer>.") == "Car horn"
    assert extract_prediction("It is probably rain.") == "It is probably rain."
    assert extract_prediction("<answer>Rain") == "<answer>Rain"  # an unclosed tag is not an answer tag
    assert extract_prediction("") == ""


def test_incorrect_tokens_by_hand():
    # answer {dog, barking}; others: {car, horn}, {rain}, {applause}
    assert incorrect_tokens("Dog barking", CHOICES) == {"car", "horn", "rain", "applause"}
    # choices sharing a word with the answer contribute only their other words
    assert incorrect_tokens("dog barking", ["dog barking", "dog howling", "cat"]) == {"howling", "cat"}
    # a choice with the answer's token set (reordered, duplicated) contributes nothing
    assert incorrect_tokens("dog barking", ["dog barking", "Barking dog", "dog barking", "cat"]) == {"cat"}


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("Dog barking", "Dog barking", True),
        ("The dog is barking loudly", "Dog barking", True),  # extra words not in other choices are fine
        ("dog", "Dog barking", False),  # misses "barking"
        ("dog barking or rain", "Dog barking", False),  # holds "rain", a token of another choice
        ("", "Dog barking", False),  # empty prediction fails
        ("!!!", "Dog barking", False),  # no token at all fails
        ("Rain", "Rain", True),
        ("(C) Rain", "Rain", True),  # "c" is no choice's token here
        ("Not rain", "Rain", True),  # the benchmarks' scripts do not read negation
    ],
)
def test_benchmark_correct_cases(prediction, answer, expected):
    assert benchmark_correct(prediction, answer, CHOICES) is expected


def test_letter_prefix_fails_when_another_choice_has_that_word():
    choices = ["a dog", "a cat", "B"]
    # answer "a dog": incorrect = {cat} ∪ {b}; "(B) a dog" holds "b" → wrong, "(A) a dog" is right
    assert benchmark_correct("(A) a dog", "a dog", choices) is True
    assert benchmark_correct("(B) a dog", "a dog", choices) is False


def test_ties_between_choices_with_the_same_words():
    choices = ["dog barking", "barking dog", "cat"]
    # Both orders are correct for either answer: neither adds incorrect tokens for the other.
    assert benchmark_correct("barking dog", "dog barking", choices) is True
    assert benchmark_correct("dog barking", "barking dog", choices) is True
    # ... so the prediction names two different options: ambiguous, no matched choice
    assert benchmark_choice("dog barking", choices) is None
    assert benchmark_choice("cat", choices) == 2


def test_subset_choices():
    choices = ["dog", "dog barking"]
    # answer "dog": incorrect = {barking}; answer "dog barking": incorrect = {} ("dog" ⊂ answer)
    assert benchmark_correct("dog", "dog", choices) is True
    assert benchmark_correct("dog barking", "dog", choices) is False
    assert benchmark_correct("dog barking", "dog barking", choices) is True
    assert benchmark_correct("dog", "dog barking", choices) is False
    assert benchmark_choice("dog barking", choices) == 1
    assert benchmark_choice("dog", choices) == 0


def test_duplicated_choices_match_the_first_copy():
    choices = ["Happy", "Sad", "Happy", "Angry"]
    assert benchmark_correct("happy", "Happy", choices) is True
    assert benchmark_choice("happy", choices) == 0  # equal texts are one option
    assert benchmark_choice("sad or angry", choices) is None


def test_strict_matching_is_the_reward_rule():
    assert predicted_choice("so <answer>B</answer>", CHOICES) == 1
    assert predicted_choice("so <answer>rain</answer>", CHOICES) == 2
    assert predicted_choice("the answer is rain", CHOICES) is None  # no tag: strict gives nothing
    assert predicted_choice("<answer>it is rain</answer>", CHOICES) is None  # not exactly an option


def test_source_answers_that_are_not_a_choice():
    assert match_answer_to_choice("piano.", ["Piano", "Guitar"]) == 0  # same token set
    assert match_answer_to_choice("The speaker is angry", ["Angry", "Calm", "Sad"]) == 0  # names it
    assert match_answer_to_choice("angry or calm", ["Angry", "Calm", "Sad"]) is None
    assert match_answer_to_choice("dog barking", ["dog barking!", "barking dog", "cat"]) is None  # two texts tie
    assert match_answer_to_choice("...", ["a", "b"]) is None
