"""The training scripts' adapters (eval/_train_core.py) and how the checkpoint builder merges them
(vtc.offline.build.merge_adapters): the adapted forward during training equals the stock model after merging,
for the language model and for the vision tower's upper blocks."""

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from vtc.offline.build import TOWER_PREFIX, merge_adapters

from .conftest import load_eval

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _core():
    if str(EVAL) not in sys.path:
        sys.path.insert(0, str(EVAL))
    return importlib.import_module("_train_core")


class _Base(torch.nn.Module):
    """What merge_adapters sees of a Llava ``model.model``: a vision tower and a language model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           image_size=28, patch_size=14)  # fmt: skip
        self.vision_tower = Dinov2Model(cfg).eval()
        self.language_model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        self.language_model[0].q_proj = torch.nn.Linear(8, 8)


def test_tower_blocks_with_adapters_equal_the_merged_tower():
    core = _core()
    base = _Base()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        stock = base.vision_tower(pixels, output_hidden_states=True).hidden_states[3][:, 1:]
    blocks = core.TowerBlocks(base.vision_tower, 1, 3)
    cached = blocks.cache(pixels)
    torch.testing.assert_close(blocks(cached), stock, atol=1e-6, rtol=0)  # no adapter: the stock feature layer
    lora = blocks.adapters(rank=4, alpha=8.0)
    assert sorted({n.split(".")[2] for n in lora.names}) == ["1", "2"]  # only the trained blocks
    assert len(lora.names) == 2 * 6  # q, k, v, o, fc1, fc2
    with torch.no_grad():
        for b in lora.b:
            b.normal_()
        adapted = blocks(cached)
    assert not torch.allclose(adapted, stock, atol=1e-3)
    state = {TOWER_PREFIX + k: v.float() for k, v in lora.state(torch.float32).items()}
    lora.remove()
    assert merge_adapters(base, state) == 12
    with torch.no_grad():
        merged = base.vision_tower(pixels, output_hidden_states=True).hidden_states[3][:, 1:]
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)  # B ~ N(0, 1): large deltas


def test_adapters_go_to_the_module_their_key_names():
    base = _Base()
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    before_lm = base.language_model[0].q_proj.weight.clone()
    before_tower = base.vision_tower.encoder.layer[0].mlp.fc1.weight.clone()
    n = merge_adapters(base, {"0.q_proj.lora_A": a, "0.q_proj.lora_B": b})
    assert n == 1
    torch.testing.assert_close(base.language_model[0].q_proj.weight, before_lm + b @ a)
    assert torch.equal(base.vision_tower.encoder.layer[0].mlp.fc1.weight, before_tower)
    with pytest.raises(ValueError, match="names no linear layer of Dinov2Model"):
        merge_adapters(base, {TOWER_PREFIX + "encoder.nothing.lora_A": a, TOWER_PREFIX + "encoder.nothing.lora_B": b})


def test_training_subsets_follow_their_rule():
    import math
    import random

    core = _core()
    n, grid, objects = 144, 12, [13, 14, 25, 26, 100]
    for seed in range(40):
        ref = random.Random(seed)
        ref.random()
        k = min(n - 1, max(1, round(math.exp(ref.uniform(0.0, math.log(n))))))
        assert core.subset(random.Random(seed), n, 0.0, "random") == sorted(ref.sample(range(n), k))  # as shipped
        pick = core.subset(random.Random(seed), n, 0.0, "objects", objects)
        assert len(pick) == k and (set(pick) <= set(objects) if k <= len(objects) else set(objects) <= set(pick))
        pick = core.subset(random.Random(seed), n, 0.0, "block", grid=grid)
        rows, cols = {i // grid for i in pick}, {i % grid for i in pick}
        box = (max(rows) - min(rows) + 1) * (max(cols) - min(cols) + 1)
        assert len(pick) == k and box < k + grid  # inside one h x w rectangle of at most k + h - 1 cells
        pick = core.subset(random.Random(seed), n, 0.0, "grid")
        assert len(pick) == k == len(set(pick))
        assert all(b - a <= math.ceil(n / k) for a, b in zip(pick, pick[1:], strict=False))  # an even spread
    assert core.subset(random.Random(0), n, 1.0, "objects", objects) == list(range(n))  # full_prob: everything
    with pytest.raises(ValueError, match="unknown subset rule"):
        core.subset(random.Random(0), n, 0.0, "nope")
    with pytest.raises(ValueError, match="square grid"):
        core.subset(random.Random(3), n, 0.0, "block")


def test_the_scenes_scripts_defaults_are_the_shipped_run():
    """``python eval/train_scenes.py`` with no options reproduces the shipped weights: its defaults equal the
    options the shipped log records (where the files go aside)."""
    log = (EVAL / "logs" / "train_scenes.log").read_text().splitlines()
    shipped = ast.literal_eval(next(line for line in log if line.startswith("args: "))[len("args: ") :])
    defaults = vars(load_eval("train_scenes").parse_args([]))
    for where in ("out_dir", "log"):
        shipped.pop(where), defaults.pop(where)
    assert defaults == shipped
    # and the generator draws the pictures it was trained on (object sizes change with scenes.VERSION)
    from vtc.offline import scenes

    drawn = next(line for line in log if line.startswith("scenes: "))
    sizes = f"digits {scenes.DIGIT_SIZE} px, shapes {scenes.SHAPE_SIZE} px"
    assert drawn == f"scenes: generator version {scenes.VERSION}, {sizes}"


def test_the_tower_cut_at_its_feature_layer_gives_the_same_features():
    from vtc.offline.build import truncated_tower

    full = _Base().vision_tower
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = full(pixels, output_hidden_states=True).hidden_states[2]
        cut = truncated_tower(_Base().vision_tower, 2)
        hidden = cut(pixels, output_hidden_states=True).hidden_states
    assert len(cut.encoder.layer) == cut.config.num_hidden_layers == 2
    assert cut.config.stage_names[-1] == "stage2" and cut.config.out_features == ["stage2"]
    assert len(hidden) == 3  # embeddings + two blocks: the same index reads the same block
    torch.testing.assert_close(hidden[2], want, atol=0, rtol=0)
    assert len(truncated_tower(_Base().vision_tower, -1).encoder.layer) == 4  # the last block: nothing to cut
    with pytest.raises(ValueError, match="patch embedding"):
        truncated_tower(_Base().vision_tower, 0)


def test_the_video_scripts_defaults_are_the_shipped_run(capsys):
    """``python eval/train_video.py`` with no options reproduces the shipped video weights: its defaults equal the
    options the shipped log records (where the files go aside)."""
    log = (EVAL / "logs" / "train_video.log").read_text().splitlines()
    shipped = ast.literal_eval(next(line for line in log if line.startswith("args: "))[len("args: ") :])
    parse_args = load_eval("train_video").parse_args
    defaults = vars(parse_args([]))
    for where in ("out_dir", "log"):
        shipped.pop(where), defaults.pop(where)
    assert defaults == shipped
    assert parse_args(["--test-only"]).log is None  # never overwrites the shipped log
    # the frozen-tower recipe is asked for whole: aligning pooled tokens needs the adapted tower
    with pytest.raises(SystemExit):
        parse_args(["--tower-rank", "0"])
    assert "--align-pooled 0 for the frozen tower" in capsys.readouterr().err
    frozen = parse_args(["--tower-rank", "0", "--align-pooled", "0"])
    assert frozen.tower_rank == 0 and frozen.align_pooled == 0
    with pytest.raises(SystemExit):
        parse_args(["--tower-rank", "0", "--align-pooled", "0", "--tower-lr", "1e-4"])
    assert "options of an adapted tower" in capsys.readouterr().err


def test_alignment_of_pooled_tokens_trains_what_the_pool_hands_on():
    """With ``pool`` the targets apply to the pooled tokens (one per 2 x 2 patches here): the loss sees only them,
    and after training each pooled token lies nearest its own target."""
    core = _core()
    base = _Base()
    torch.manual_seed(1)
    pixels = torch.randn(8, 3, 28, 28)  # 2 x 2 patches each
    blocks = core.TowerBlocks(base.vision_tower, 1, 3)
    with torch.no_grad():
        hidden = blocks.cache(pixels)
    inner = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    proj = core.Projector(inner, torch.zeros(32), torch.ones(32))
    targets = torch.randn(4, 16)
    codes = torch.tensor([[i % 4] for i in range(8)])  # one pooled token per image
    pooled = []

    def pool(x):  # [B, 4, D] -> [B, 1, D]
        pooled.append(x.shape)
        return x.mean(1, keepdim=True)

    lines = []
    core.align_with_tower(proj, blocks, None, hidden, codes, targets, 150, 1e-2, lines.append, batch=8, pool=pool)
    assert pooled[0] == (8, 4, 16)
    assert "object pooled tokens whose nearest target is their own (colour, kind): 1.000" in lines[-1]
    patch_codes = codes.repeat(1, 4)
    with pytest.raises(RuntimeError):  # patch-level codes do not fit pooled tokens
        core.align_with_tower(proj, blocks, None, hidden, patch_codes, targets, 1, 1e-2, lines.append, pool=pool)
