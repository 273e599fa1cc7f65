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
    # dropped cells are dimmed: the picture is darker than the bundled photo seen by the model
    from vtc.apps.demo import IMAGE_SIZE, default_image
    from vtc.apps.viz import fit_square

    photo = fit_square(default_image(), IMAGE_SIZE).convert("L")
    assert np.asarray(picture).mean() < 0.8 * np.asarray(photo).mean()


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
    rows = json.loads(capsys.readouterr().out)
    assert {"hired", "divprune"} <= {r["name"] for r in rows}


@pytest.mark.parametrize(
    "args", [["demo", "--budget", "1.5"], ["demo", "--method", "nope"], ["demo", "--budget", "x"]]
)
def test_bad_arguments_exit_with_a_message(args, capsys):
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert "error" in capsys.readouterr().err
