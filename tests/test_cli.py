import json

import numpy as np
import pytest
from PIL import Image

from vtc.apps.cli import main


def test_demo_prints_the_table_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "kept.png"
    args = ["demo", "--model", "tiny", "--method", "hired", "--budget", "0.25", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| uncompressed | 576 | 1.000 |" in text and "| hired | 144 | 0.250 |" in text
    picture = Image.open(out).convert("L")
    lo, hi = picture.getextrema()
    assert hi - lo > 50  # not blank
    from vtc.apps.demo import IMAGE_SIZE, default_image
    from vtc.apps.viz import fit_square

    # two panels, side by side: the image uncompressed, then hired's (dropped cells dimmed: darker)
    photo = np.asarray(fit_square(default_image(), IMAGE_SIZE).convert("L"), dtype=np.float32)
    assert picture.size[0] == 2 * IMAGE_SIZE
    panels = np.asarray(picture, dtype=np.float32)[-IMAGE_SIZE:]
    assert np.abs(panels[:, :IMAGE_SIZE] - photo).max() <= 1
    assert panels[:, IMAGE_SIZE:].mean() < 0.8 * photo.mean()


@pytest.mark.slow
def test_demo_all_runs_every_image_method(tmp_path, capsys):
    """`make demo` runs `--method all`: every image method (video-only mergers are not image methods)."""
    import vtc

    args = ["demo", "--model", "tiny", "--method", "all", "--repeats", "1", "--out", str(tmp_path / "k.png")]
    assert main(args) == 0
    text = capsys.readouterr().out
    names = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")} - {"run", "---"}
    image = {m.name for m in vtc.list_methods() if "image" in m.method_class.modalities}
    assert names == image | {"uncompressed"} and {"hired", "tome", "fastv"} <= image
    assert not {"dycoke", "fastvid", "holitom"} & names


def test_demo_refuses_a_video_method(capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--model", "tiny", "--method", "dycoke"])
    assert err.value.code == 2 and "compresses videos" in capsys.readouterr().err


def test_methods_lists_json(capsys):
    assert main(["methods"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"hired", "divprune"} <= set(rows)
    video = {"llava_next_video", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"}
    assert set(rows["holitom"]["families"]) == set(rows["dycoke"]["families"]) == video  # no image-only family
    image_only = {"llava", "llava_next", "internvl", "gemma3"}
    assert image_only | video == set(rows["divprune"]["families"])  # every model type, Qwen2.5-VL too
    assert rows["holitom"]["budget_counts"] == rows["todre"]["budget_counts"] == "pre_llm"
    assert rows["fastv"]["budget_counts"] == rows["pdrop"]["budget_counts"] == "last_stage"


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--budget", "1.5"],
        ["demo", "--method", "nope"],
        ["demo", "--budget", "x"],
        ["demo", "--image", "nowhere.png", "--question", "what is it?"],
    ],
)
def test_bad_arguments_exit_with_a_message(args, capsys):
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "error" in err[0] and err[1].startswith("hint:")  # one line and a hint, no usage
