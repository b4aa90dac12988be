"""Writers of small benchmark files laid out as the real releases are, and the committed fixtures.

Not a test module: tests import the writers (`from benchmark_files import ...`). Run it as a script to
rebuild tests/fixtures/ (deterministic):

    python tests/benchmark_files.py

tests/fixtures/ then holds, each with tiny 16 kHz tones as its audio:
- mmau/mmau-test-mini.json + test-mini-audios/: 4 rows, key order varying, one `category` a list, two
  rows with duplicated choice strings (one duplicating the answer);
- mmau/mmau-test.json + test-audios/: 2 rows of the test split, answers hidden ("");
- mmar/MMAR-meta.json + audio/: 3 rows, two answers that are not literally a choice;
- MMSU/question/mmsu.jsonl + MMSU/audio/: 4 rows, audio_path "/audio/<id>.wav", a null choice_d,
  numeric choices and answer, a letter answer;
- mmsu_hf/data/test-00000-of-00001.parquet: the same MMSU rows with the audio embedded (needs pyarrow);
- avqa/val_qa.json + videos/: 5 annotation rows over 2 small mp4 videos with an audio track (needs
  PyAV), one broken video file and one missing video.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SR = 16_000


def tone(freq: float, seconds: float = 0.25, sr: int = SR, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tone(path: Path, freq: float, seconds: float = 0.25) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(freq, seconds), SR, subtype="PCM_16")
    return path


def write_mp4(path: Path, freq: float, seconds: float = 0.5, sr: int = 22_050, video: bool = True) -> Path:
    """A small mp4 with a stereo AAC tone (sr Hz) and, by default, a few black 16×16 frames; built with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    samples = tone(freq, seconds, sr)
    with av.open(str(path), "w") as container:
        audio = container.add_stream("aac", rate=sr)
        audio.layout = "stereo"
        frames = None
        if video:
            frames = container.add_stream("mpeg4", rate=10)
            frames.width, frames.height, frames.pix_fmt = 16, 16, "yuv420p"
        size = audio.codec_context.frame_size or 1024
        for start in range(0, len(samples), size):
            chunk = samples[start : start + size]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.stack([chunk, chunk])), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = sr, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode(None):
            container.mux(packet)
        if frames is not None:
            for k in range(int(seconds * 10)):
                image = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
                image.pts = k
                for packet in frames.encode(image):
                    container.mux(packet)
            for packet in frames.encode(None):
                container.mux(packet)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """A parquet file of `rows` (their `audio` values as {"bytes", "path"} structs, as the Hub stores them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------------------- the rows

MMAU_TEST_MINI = [
    {"id": "mmau-1", "audio_id": "./test-mini-audios/mmau-1.wav", "question": "Which sound is heard?",
     "choices": ["Dog barking", "Car horn", "Rain", "Applause"], "answer": "Dog barking", "dataset": "fixture",
     "task": "sound", "split": "test-mini", "category": "Sound Event Recognition",
     "sub-category": "Animal sounds", "difficulty": "easy"},
    # Another key order, a list-valued category and a null sub-category.
    {"question": "Which instrument plays the melody?", "id": "mmau-2", "task": "music",
     "choices": ["Piano", "Guitar", "Violin", "Drums"], "answer": "Violin",
     "audio_id": "./test-mini-audios/mmau-2.wav", "difficulty": "medium",
     "category": ["Instrument Identification", "Timbre"], "sub-category": None, "split": "test-mini",
     "dataset": "fixture"},
    # Duplicated choice strings, the answer among them.
    {"id": "mmau-3", "audio_id": "./test-mini-audios/mmau-3.wav", "question": "What emotion does the speaker show?",
     "choices": ["Happy", "Sad", "Happy", "Angry"], "answer": "Happy", "task": "speech", "split": "test-mini",
     "category": "Emotion", "sub-category": "Emotion recognition", "difficulty": "hard", "dataset": "fixture"},
    # Duplicated choice strings, the answer not among them.
    {"difficulty": "easy", "task": "sound", "id": "mmau-4", "answer": "Three", "choices": ["One", "Two", "Two", "Three"],
     "question": "How many knocks are there?", "audio_id": "./test-mini-audios/mmau-4.wav", "split": "test-mini",
     "category": "Counting", "sub-category": "Event counting", "dataset": "fixture"},
]

MMAU_TEST = [
    {"id": "mmau-t1", "audio_id": "./test-audios/mmau-t1.wav", "question": "Which sound is heard?",
     "choices": ["Siren", "Bird song"], "answer": "", "task": "sound", "split": "test", "category": "Sound Event Recognition",
     "sub-category": "Alarms", "difficulty": "easy", "dataset": "fixture"},
    {"id": "mmau-t2", "audio_id": "./test-audios/mmau-t2.wav", "question": "What genre is this?",
     "choices": ["Jazz", "Rock", "Classical"], "answer": "", "task": "music", "split": "test", "category": "Genre",
     "sub-category": "Genre recognition", "difficulty": "medium", "dataset": "fixture"},
]

_MMAR_COMMON = {"language": "None", "source": "fixture", "url": "https://example.org/v", "timestamp": "00:00:01-00:00:02"}
MMAR_META = [
    {"id": "mmar-1", "audio_path": "./audio/mmar-1.wav", "question": "How many beeps are there?",
     "choices": ["two", "three", "four"], "answer": "three", "modality": "sound", "category": "Signal Layer",
     "sub-category": "Counting", **_MMAR_COMMON},
    # Not literally a choice: same tokens as "Piano".
    {"id": "mmar-2", "audio_path": "./audio/mmar-2.wav", "question": "Which instrument is played?",
     "choices": ["Piano", "Guitar"], "answer": "piano.", "modality": "music", "category": "Perception Layer",
     "sub-category": "Instrument", **_MMAR_COMMON},
    # Not literally a choice: a sentence naming "Angry" under the benchmark tokenisation.
    {"id": "mmar-3", "audio_path": "./audio/mmar-3.wav", "question": "How does the speaker feel?",
     "choices": ["Angry", "Calm", "Sad"], "answer": "The speaker is angry", "modality": "mix-sound-speech",
     "category": "Semantic Layer", "sub-category": "Emotion", **_MMAR_COMMON},
]

_MMSU_COMMON = {"sub-sub-category": "fixture", "linguistics_sub_discipline": "phonetics"}
MMSU_ROWS = [
    {"id": "mmsu_0001", "task_name": "emotion_recognition", "audio_path": "/audio/mmsu_0001.wav",
     "question": "Which emotion does the speaker express?", "choice_a": "happy", "choice_b": "sad",
     "choice_c": "angry", "choice_d": "neutral", "answer_gt": "sad", "category": "perception",
     "sub-category": "paralinguistics", **_MMSU_COMMON},
    # choice_d null: three options.
    {"id": "mmsu_0002", "task_name": "intonation_perception", "audio_path": "/audio/mmsu_0002.wav",
     "question": "Is the intonation rising, falling or flat?", "choice_a": "rising", "choice_b": "falling",
     "choice_c": "flat", "choice_d": None, "answer_gt": "rising", "category": "perception",
     "sub-category": "phonology", **_MMSU_COMMON},
    # Numbers as choices and answer.
    {"id": "mmsu_0003", "task_name": "syllable_counting", "audio_path": "/audio/mmsu_0003.wav",
     "question": "How many syllables does the word have?", "choice_a": 1, "choice_b": 2, "choice_c": 3,
     "choice_d": 4, "answer_gt": 3, "category": "perception", "sub-category": "phonology", **_MMSU_COMMON},
    # The answer given as a letter.
    {"id": "mmsu_0004", "task_name": "sarcasm_detection", "audio_path": "/audio/mmsu_0004.wav",
     "question": "Is the speaker sarcastic?", "choice_a": "yes", "choice_b": "no", "choice_c": None,
     "choice_d": None, "answer_gt": "B", "category": "reasoning", "sub-category": "semantics", **_MMSU_COMMON},
]

AVQA_ROWS = [
    {"id": 101, "video_name": "vid_a", "video_id": 1, "question_text": "What is making the sound in the video?",
     "multi_choice": ["car", "dog", "piano", "rain"], "answer": 2, "question_relation": "Both", "question_type": "Which"},
    {"id": 102, "video_name": "vid_b", "video_id": 2, "question_text": "Video: how many times does it ring?",
     "multi_choice": ["one", "two", "three", "four"], "answer": 0, "question_relation": "Audio", "question_type": "Count"},
    {"id": 103, "video_name": "vid_broken", "video_id": 3, "question_text": "What plays in the video?",
     "multi_choice": ["a", "b", "c", "d"], "answer": 1, "question_relation": "Both", "question_type": "Which"},
    {"id": 104, "video_name": "vid_missing", "video_id": 4, "question_text": "Where is the video taken?",
     "multi_choice": ["a", "b", "c", "d"], "answer": 3, "question_relation": "Visual", "question_type": "Where"},
    {"id": 105, "video_name": "vid_a", "video_id": 1, "question_text": "Is the sound in the video loud?",
     "multi_choice": ["yes", "no"], "answer": 0, "question_relation": "Audio", "question_type": "Judge"},
]


def write_rows_and_tones(folder: Path, name: str, rows: list[dict], audio_key: str, json_array: bool = True) -> Path:
    """The manifest `folder/name` and one tone per row at its audio path (relative to `folder`)."""
    for k, row in enumerate(rows):
        write_tone(folder / row[audio_key].lstrip("/").removeprefix("./"), 300 + 110 * k)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows, indent=4) + "\n" if json_array else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    return path


def write_mmsu(folder: Path) -> Path:
    """MMSU/question/mmsu.jsonl + MMSU/audio/ (audio_path "/audio/<id>.wav" means the MMSU folder)."""
    for k, row in enumerate(MMSU_ROWS):
        write_tone(folder / row["audio_path"].lstrip("/"), 500 + 70 * k)
    path = folder / "question" / "mmsu.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in MMSU_ROWS))
    return path


def mmsu_parquet_rows(audio_folder: Path) -> list[dict]:
    """MMSU_ROWS as the Hub's parquet holds them: `audio` = {"bytes", "path"}, no audio_path."""
    rows = []
    for row in MMSU_ROWS:
        clip = audio_folder / row["audio_path"].lstrip("/")
        rest = {k: v for k, v in row.items() if k != "audio_path"}
        # Parquet columns have one type: the Hub release stores every choice as text.
        rest.update({k: None if v is None else str(v) for k, v in rest.items() if k.startswith("choice_") or k == "answer_gt"})
        rows.append({**rest, "audio": {"bytes": clip.read_bytes(), "path": clip.name}})
    return rows


def write_avqa(folder: Path) -> Path:
    write_mp4(folder / "videos" / "vid_a.mp4", 440)
    write_mp4(folder / "videos" / "vid_b.mp4", 660, video=False)
    (folder / "videos" / "vid_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    path = folder / "val_qa.json"
    path.write_text(json.dumps(AVQA_ROWS, indent=2) + "\n")
    return path


def main() -> None:
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    write_rows_and_tones(FIXTURES / "mmau", "mmau-test-mini.json", MMAU_TEST_MINI, "audio_id")
    write_rows_and_tones(FIXTURES / "mmau", "mmau-test.json", MMAU_TEST, "audio_id")
    write_rows_and_tones(FIXTURES / "mmar", "MMAR-meta.json", MMAR_META, "audio_path")
    write_mmsu(FIXTURES / "MMSU")
    write_parquet(FIXTURES / "mmsu_hf" / "data" / "test-00000-of-00001.parquet", mmsu_parquet_rows(FIXTURES / "MMSU"))
    write_avqa(FIXTURES / "avqa")
    print(f"wrote {sum(1 for p in FIXTURES.rglob('*') if p.is_file())} files under {FIXTURES}")


if __name__ == "__main__":
    main()
