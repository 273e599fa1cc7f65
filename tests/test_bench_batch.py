"""``eval/bench_batch.py``: a ragged batch through ``generate``, compressed against uncompressed."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import bench_batch  # noqa: E402
import speed_presets  # noqa: E402

import vtc  # noqa: E402


def test_a_compressed_ragged_batch_is_only_as_long_as_its_longest_compressed_sample():
    """The caller's left padding is dropped before the batch is padded anew: the KV cache holds the longest
    compressed prompt, not the uncompressed batch's padding (which kept a 196-token image's row at 1,241)."""
    model = speed_presets.qwen2_vl_model(vision=(32, 1, 2), text=(64, 2, 4, 2, 128))
    inputs = bench_batch.batch_inputs(model, 3)
    lengths = inputs["attention_mask"].sum(1).tolist()
    with vtc.compressed(model, "divprune", budget=0.2), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        rec = vtc.last_record(model)
    visual = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    kept = [sum(len(im.kept) for im in rec.images_of(b)) for b in range(3)]
    longest = max(n - v + k for n, v, k in zip(lengths, visual, kept, strict=True))
    assert out.past_key_values.layers[0].keys.shape[-2] == longest + 1  # + the first generated token
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 2  # the caller still gets its own layout


def test_the_benchmark_writes_its_table(tmp_path):
    result = bench_batch.main(
        ["--small", "--batch", "2", "--repeats", "1", "--new-tokens", "2", "--threads", "1", "--methods", "divprune"]
        + ["--out", str(tmp_path)]
    )
    first, second = result["rows"]
    assert first["method"] == "uncompressed" and second["method"] == "divprune"
    assert second["kv_bytes_per_sample"] < first["kv_bytes_per_sample"]
    assert len(second["visual_tokens_kept"]) == 2 and "largest" in second["cap"]
    assert "| divprune | 0.2 |" in (tmp_path / "batch.md").read_text()
