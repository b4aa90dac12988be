"""Scoring rows, summaries, breakdowns, predictions files and `make score`, with hand-worked values."""

from __future__ import annotations

import json

import pytest

from benchmark_files import FIXTURES
from mapo.eval.benchmark import load_benchmark
from mapo.eval.predictions import PredictionsError, read_predictions
from mapo.eval.results import score_rows, summarize, summary_markdown
from mapo.eval.score import main as score_main

MMAU = FIXTURES / "mmau" / "mmau-test-mini.json"

# mmau-1 sound/easy "Dog barking"; mmau-2 music/medium "Violin"; mmau-3 speech/hard "Happy" (choices
# Happy, Sad, Happy, Angry); mmau-4 sound/easy "Three" (choices One, Two, Two, Three).
AUDIO = [
    "It barks. <answer>(A) Dog barking</answer>",  # benchmark ✓ (no other choice has "a"), strict ✓ (letter + text)
    "A violin plays the melody.",  # benchmark ✓ (whole output, holds "violin" only), strict ✗ (no tag)
    "<answer>C</answer>",  # benchmark ✗ ("c" is not "happy"), strict ✓ (letter C = the duplicated "Happy")
    "<answer>two</answer>",  # ✗ both; matched choice "Two"
]
NO_AUDIO = ["<answer>Rain</answer>", "<answer>Violin</answer>", "", "<answer>Three</answer>"]


@pytest.fixture(scope="module")
def mmau():
    return load_benchmark(MMAU)


def test_rows_by_hand(mmau):
    rows = score_rows(mmau.records, {"audio": AUDIO})
    assert [(r["extracted_answer"], r["matched_choice"], r["correct"], r["strict_choice"], r["correct_strict"]) for r in rows] == [
        ("(A) Dog barking", "Dog barking", True, "Dog barking", True),
        ("A violin plays the melody.", "Violin", True, None, False),
        ("C", None, False, "Happy", True),
        ("two", "Two", False, "Two", False),
    ]
    assert rows[0] == {
        "id": "mmau-1", "condition": "audio", "model_output": AUDIO[0], "extracted_answer": "(A) Dog barking",
        "matched_choice": "Dog barking", "correct": True, "strict_choice": "Dog barking", "correct_strict": True,
        "answer": "Dog barking",
    }


def test_strict_column_is_the_training_reward():
    """correct_strict is `accuracy_reward` itself: duplicated option texts differing in case (as some MMAU
    rows have) score by meaning, not by which duplicate the tag matched first."""
    from mapo.data.schema import Record
    from mapo.rewards import accuracy_reward

    record = Record(id="d", question="Is it a dog?", choices=["Yes", "yes", "No"], answer="yes", audio=None, task="t")
    outputs = ["<answer>yes</answer>", "<answer>No</answer>", "yes"]
    rows = score_rows([record] * 3, {"audio": outputs})
    assert [r["strict_choice"] for r in rows] == ["Yes", "No", None]
    assert [r["correct_strict"] for r in rows] == [True, False, False]
    assert [r["correct_strict"] for r in rows] == [accuracy_reward(o, record) == 1.0 for o in outputs]


def test_summary_values_and_breakdowns(mmau):
    rows = score_rows(mmau.records, {"audio": AUDIO, "no_audio": NO_AUDIO})
    summary = summarize(mmau.records, rows, "mmau", notes=mmau.notes, model="m")
    assert summary["overall"] == {"accuracy": 0.5, "accuracy_strict": 0.5, "n": 4, "correct": 2, "correct_strict": 2}
    assert summary["main_condition"] == "audio" and summary["conditions"] == ["audio", "no_audio"]
    acc = lambda part: {k: v["accuracy"] for k, v in part.items()}  # noqa: E731
    assert acc(summary["breakdowns"]["task"]) == {"music": 1.0, "sound": 0.5, "speech": 0.0}
    assert acc(summary["breakdowns"]["difficulty"]) == {"easy": 0.5, "hard": 0.0, "medium": 1.0}
    assert acc(summary["breakdowns"]["sub-category"]) == {
        "(none)": 1.0, "Animal sounds": 1.0, "Emotion recognition": 0.0, "Event counting": 0.0}
    strict = {k: v["accuracy_strict"] for k, v in summary["breakdowns"]["task"].items()}
    assert strict == {"music": 0.0, "sound": 0.5, "speech": 1.0}
    no_audio = summary["by_condition"]["no_audio"]["overall"]
    assert (no_audio["accuracy"], no_audio["correct"]) == (0.5, 2)
    # matched choices audio → no_audio: Dog barking→Rain (flip), Violin→Violin, None→None, Two→Three (flip)
    assert summary["flip_rate"] == {"no_audio": 0.5}
    assert summary["model"] == "m" and summary["accuracy_computable"] is True
    md = summary_markdown(summary)
    assert "| with audio | 4 | 50.00 | 50.00 |" in md and "| audio removed | 4 | 50.00 | 50.00 |" in md
    assert "| audio removed | 0.500 |" in md
    assert "| sound | 2 | 50.00 | 50.00 |" in md and "| speech | 1 | 0.00 | 0.00 |" in md


def test_mmar_scores_against_the_source_answer():
    bench = load_benchmark(FIXTURES / "mmar" / "MMAR-meta.json")
    outputs = ["<answer>three</answer>", "<answer>Piano</answer>", "<answer>Angry</answer>"]
    rows = score_rows(bench.records, {"audio": outputs})
    # mmar-3's file answer is "The speaker is angry": its script needs all four words, so "Angry" fails
    # there (and passes our strict matching, which compares with the matched choice "Angry").
    assert [(r["correct"], r["correct_strict"]) for r in rows] == [(True, True), (True, True), (False, True)]
    rows = score_rows(bench.records, {"audio": outputs[:2] + ["<answer>the speaker is angry</answer>"]})
    assert rows[2]["correct"] is True and rows[2]["correct_strict"] is False
    summary = summarize(bench.records, rows, "mmar")
    assert list(summary["breakdowns"]) == ["modality", "category", "sub-category"]
    assert summary["breakdowns"]["modality"]["mix-sound-speech"] == {
        "accuracy": 1.0, "accuracy_strict": 0.0, "n": 1, "correct": 1, "correct_strict": 0}


def test_mmsu_breakdowns():
    bench = load_benchmark(FIXTURES / "MMSU" / "question" / "mmsu.jsonl")
    rows = score_rows(bench.records, {"audio": ["sad", "falling", "<answer>3</answer>", "<answer>B</answer>"]})
    assert [r["correct"] for r in rows] == [True, False, True, False]  # "B" is not the word "no"
    assert [r["correct_strict"] for r in rows] == [False, False, True, True]
    summary = summarize(bench.records, rows, "mmsu")
    assert {k: v["accuracy"] for k, v in summary["breakdowns"]["category"].items()} == {"perception": 2 / 3, "reasoning": 0.0}
    assert list(summary["breakdowns"]["task"]) == [
        "emotion_recognition", "intonation_perception", "sarcasm_detection", "syllable_counting"]


def test_hidden_answers_give_no_accuracy():
    bench = load_benchmark(FIXTURES / "mmau" / "mmau-test.json", check_audio=False)
    rows = score_rows(bench.records, {"audio": ["<answer>Siren</answer>", "jazz"]})
    assert [(r["correct"], r["correct_strict"], r["answer"], r["matched_choice"]) for r in rows] == [
        (None, None, None, "Siren"), (None, None, None, "Jazz")]
    summary = summarize(bench.records, rows, "mmau", notes=bench.notes)
    assert summary["accuracy_computable"] is False
    assert summary["overall"] == {"accuracy": None, "accuracy_strict": None, "n": 2, "correct": None, "correct_strict": None}
    assert summary["notes"][-1].startswith("answers are hidden: accuracy cannot be computed here")
    assert "| with audio | 2 | – | – |" in summary_markdown(summary)


def test_read_predictions_layouts(tmp_path):
    ours = tmp_path / "p.jsonl"
    ours.write_text('{"id": "a", "condition": "no_audio", "model_output": "x", "correct": true}\n\n{"id": 2, "model_output": null}\n')
    assert read_predictions(ours) == [{"id": "a", "condition": "no_audio", "model_output": "x"},
                                      {"id": "2", "condition": "audio", "model_output": None}]
    plain = tmp_path / "p.json"
    plain.write_text(json.dumps([{"id": "a", "model_output": "y"}, {"id": "b", "question": "q", "model_prediction": "z"}]))
    assert read_predictions(plain) == [{"id": "a", "condition": "audio", "model_output": "y"},
                                       {"id": "b", "condition": "audio", "model_output": "z"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "model_output": "x"}\n{"id": "b"}\n')
    with pytest.raises(PredictionsError, match=r"bad\.jsonl:2: no model_output or model_prediction field"):
        read_predictions(bad)
    bad.write_text('{"id": "a", "model_output": "x"}\n{"id": "a", "model_output": "y"}\n')
    with pytest.raises(PredictionsError, match="id 'a' has two predictions under condition 'audio'"):
        read_predictions(bad)
    bad.write_text('{"id": "a", "model_output": 3}\n')
    with pytest.raises(PredictionsError, match=r"bad\.jsonl:1: 'model_output' is int, expected a string"):
        read_predictions(bad)


_PREDICTION_FILE_ERRORS = [
    # (file, bytes, message): the byte-order mark of line 1 is tolerated; an array element is named by
    # the line it starts on; nothing written means no file.
    ("bad.jsonl", b'\xef\xbb\xbf{"id": "a", "model_output": "x"}\n{"id": "b", "model_output": \n',
     r"bad\.jsonl:2: invalid JSON: Expecting value at column 29$"),
    ("bad.jsonl", b'{"id": "a", "model_output": "\xff"}\n', r"bad\.jsonl:1: not valid UTF-8: byte 0xff at byte column 30"),
    ("out.json", b'[\n  {"id": "a", "model_output": "x"},\n  {"id": "b"}\n]\n',
     r"out\.json:3: no model_output or model_prediction field"),
    ("out.json", b'[\n  {"id": "a", "model_output": "x"}\n  {"id": "b"}\n]\n',
     r"out\.json:3: invalid JSON: expected ',' or ']' after an element"),
    ("out.json", b"\n", r"out\.json: predictions file holds no rows"),
    ("missing.jsonl", None, r"missing\.jsonl: predictions file not found"),
]


@pytest.mark.parametrize(("name", "data", "message"), _PREDICTION_FILE_ERRORS)
def test_read_predictions_errors_name_the_file_and_line(tmp_path, name, data, message):
    """The manifest reader's container rules and file:line messages, as PredictionsError."""
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(PredictionsError, match=message):
        read_predictions(path)


def test_score_cli_rescoring_a_plain_list(tmp_path, capsys):
    pred = tmp_path / "outputs.json"
    pred.write_text(json.dumps([{"id": f"mmau-{k + 1}", "model_output": text} for k, text in enumerate(AUDIO[:3])]
                               + [{"id": "stray", "model_output": "x"}]))
    assert score_main([str(pred), "--data", str(MMAU)]) == 0
    out = tmp_path / "rescored"
    summary = json.loads((out / "summary.json").read_text())
    # mmau-4 has no prediction: counted as wrong (2 right of 4)
    assert summary["overall"]["accuracy"] == 0.5 and summary["overall"]["n"] == 4
    assert "audio: 1 item(s) without a prediction counted as wrong (e.g. 'mmau-4')" in summary["notes"]
    assert "audio: 1 prediction(s) with ids not in the manifest ignored (e.g. 'stray')" in summary["notes"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, False, False] and rows[3]["model_output"] is None
    # the submission file: the manifest's rows as released plus model_prediction (rows with an output)
    submission = json.loads((out / "submission.json").read_text())
    source = json.loads(MMAU.read_text())
    assert submission == [{**row, "model_prediction": AUDIO[k]} for k, row in enumerate(source[:3])]
    assert (out / "summary.md").is_file() and (out / "charts" / "accuracy_by_task.png").stat().st_size > 0
    assert f"scores written to: {out.resolve()}" in capsys.readouterr().out
    # --predicted-only scores the 3 answered items, as the benchmarks' scripts skip the others
    assert score_main([str(pred), "--data", str(MMAU), "--out", str(tmp_path / "only"), "--predicted-only"]) == 0
    only = json.loads((tmp_path / "only" / "summary.json").read_text())
    assert only["overall"] == {"accuracy": 2 / 3, "accuracy_strict": 2 / 3, "n": 3, "correct": 2, "correct_strict": 2}


def test_score_cli_errors(tmp_path, capsys):
    assert score_main([str(tmp_path / "none.json"), "--data", str(MMAU)]) == 2
    assert "predictions file not found" in capsys.readouterr().err
    pred = tmp_path / "p.json"
    pred.write_text("[]")
    assert score_main([str(pred), "--data", str(tmp_path / "missing.json")]) == 2
    assert "manifest not found" in capsys.readouterr().err
