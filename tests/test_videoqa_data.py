"""The JSONL dataset format, prompts, answer parsing and the results-file helpers of ``vtc.apps.pipelines``."""

from __future__ import annotations

import json

import pytest

from vtc.apps.pipelines.qa import DatasetError, load_samples, parse_choice, question_prompt, score
from vtc.apps.pipelines.report import summarize
from vtc.apps.pipelines.results import ResultStore, read_rows

OPTIONS = {"A": "a cat", "B": "a dog", "C": "two birds", "D": "nothing"}


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("B. a dog", "B"),
        ("Answer: D", "D"),
        ("The answer is C.", "C"),
        ("A man walks a dog, so B", "B"),  # "A man": an article, not option A
        ("A", "A"),
        ("A.", "A"),
        ("I think it is D", "D"),
        ("it shows two birds", "C"),  # no letter: the option text
        ("a dog", "B"),
        ("E", None),  # not an option
        ("BD", None),  # not standalone
        ("no idea", None),
        ("", None),
    ],
)
def test_parse_choice(reply, expected):
    assert parse_choice(reply, OPTIONS) == expected


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_samples_resolve_paths_and_normalise_options(tmp_path):
    path = _write(
        tmp_path,
        [
            {"id": 1, "video": "clips/a.mp4", "question": " q? ", "options": ["A. red", "B. blue"], "answer": "B"},
            {"id": "x", "video": "/abs/b.mp4", "question": "q", "options": {"a": "red", "b": "blue"}, "answer": "red"},
            {"id": 3, "video": "c.mp4", "question": "what?", "answer": "Red car"},
            {"id": 4, "video": "c.mp4", "question": "what?"},
        ],
    )
    s = load_samples(path)
    assert s[0].video == str(tmp_path / "clips" / "a.mp4") and s[1].video == "/abs/b.mp4"
    assert s[0].options == {"A": "red", "B": "blue"} and s[0].answer == "B" and s[0].question == "q?"
    assert s[1].options == {"A": "red", "B": "blue"} and s[1].answer == "A"  # answer given as the option text
    instruction = "Answer with the option's letter from the given choices directly."
    assert question_prompt(s[0]) == f"q?\nA. red\nB. blue\n{instruction}"
    assert question_prompt(s[2]) == "what?"
    assert score(s[0], "B") == ("B", True) and score(s[0], "A") == ("A", False)
    assert score(s[2], "red car.") == ("red car.", True)  # free text: normalised exact match
    assert score(s[3], "anything") == ("anything", None)  # no answer: not scored


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "not valid JSON"),
        ({"id": 1, "video": "a.mp4"}, "missing \\['question'\\]"),
        ({"id": [1], "video": "a.mp4", "question": "q"}, "id must be"),
        ({"id": 1, "video": "", "question": "q"}, "video must be a non-empty string"),
        ({"id": 1, "video": "a.mp4", "question": "q", "options": ["only one"]}, "needs at least 2 options"),
        ({"id": 1, "video": "a.mp4", "question": "q", "options": "A or B"}, "options must be a list"),
        ({"id": 1, "video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "C"}, "neither an option"),
    ],
)
def test_malformed_datasets_fail_with_the_line(tmp_path, row, message):
    path = _write(tmp_path, [{"id": 0, "video": "a.mp4", "question": "q"}, row])
    with pytest.raises(DatasetError, match=f"d.jsonl:2: .*{message}"):
        load_samples(path)


def test_duplicate_ids_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="d.jsonl:2: id '1' already used on line 1"):
        rows = [{"id": 1, "video": "a", "question": "q"}, {"id": "1", "video": "b", "question": "q"}]
        load_samples(_write(tmp_path, rows))
    with pytest.raises(DatasetError, match="no samples"):
        load_samples(_write(tmp_path, [""], "empty.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "none.jsonl")


def test_results_tolerate_a_partial_last_line_but_not_a_corrupt_middle(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "pred')
    assert [r["id"] for r in read_rows(path)] == [1, 2]
    store = ResultStore(path, run={"m": 1})
    with store.writer() as write:  # appending first drops the partial line
        write({"id": 3})
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n{"id": 3, "run": {"m": 1}}\n'
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(ValueError, match="r.jsonl:2"):
        read_rows(path)


def test_summary_counts(tmp_path):
    data = [{"id": i, "video": "v", "question": "q", "answer": "x"} for i in range(4)]
    samples = load_samples(_write(tmp_path, data))
    rows = [
        {
            "id": 0,
            "correct": True,
            "prefill_s": 0.1,
            "prefill_s_uncompressed": 0.3,
            "visual_tokens_before": 64,
            "visual_tokens_after": 16,
        },
        {
            "id": 1,
            "correct": False,
            "prefill_s": 0.2,
            "prefill_s_uncompressed": 0.5,
            "visual_tokens_before": 64,
            "visual_tokens_after": 16,
        },
        {"id": 2, "error": "FileNotFoundError: x"},
        {"id": 99, "correct": True},  # not in the dataset: ignored
    ]
    s = summarize(rows, samples, "hired@0.25")
    assert (s.done, s.failed, s.scored, s.correct) == (3, 1, 2, 1)
    assert s.prefill_s == pytest.approx(0.15) and s.prefill_s_uncompressed == pytest.approx(0.4)
    text = s.text()
    assert "accuracy [hired@0.25]: 50.0% (1/2) | 3/4 samples done, 1 failed, 1 not run yet" in text
    assert "uncompressed 400.0 ms, hired@0.25 150.0 ms (2.67x)" in text and "64.0 -> 16.0" in text


def test_simple_progress_without_tqdm(capsys):
    from vtc.apps.pipelines.videoqa import _simple_progress

    assert list(_simple_progress([1, 2, 3], 3, "random@0.2", every=0.0)) == [1, 2, 3]
    assert "videoqa random@0.2: 3/3 samples" in capsys.readouterr().err
