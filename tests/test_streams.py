"""Side streams: a tensor an adapter declares once is reduced with exactly the rows / indices of the tokens."""

import types

import pytest
import torch

import vtc
from vtc.adapters.base import Encoded
from vtc.adapters.encode import pack
from vtc.adapters.streams import RowStream, TokenStream
from vtc.contexts import Layout, Reduction
from vtc.testing import compressed_inputs, llava_inputs, tiny_llava


def test_a_declared_row_stream_takes_the_rows_of_the_ids():
    model = tiny_llava(seed=1)
    inputs = llava_inputs(model, ((2, 5), (4, 1)), padding_side="left", seed=3)
    inputs["tags"] = inputs["input_ids"] * 10 + 7  # row-aligned with the prompt, derived from the ids
    with vtc.compressed(model, "divprune", budget=0.25):
        adapter = vtc.session_of(model).adapter
        adapter.row_streams = (*adapter.row_streams, RowStream("tags", fill=-1))
        out = compressed_inputs(model, inputs)
    assert out["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    real = out["attention_mask"].bool()  # the caller's padding is dropped; new padding takes the stream's fill
    assert torch.equal(out["tags"][real], (out["input_ids"] * 10 + 7)[real])
    assert (out["tags"][~real] == -1).all() and (~real).any()


def test_token_stream_split_reduce_pack():
    stream = TokenStream("deepstack")
    value = [torch.arange(10.0)[:, None] * (layer + 1) for layer in range(2)]  # two layers, 4 + 6 tokens
    first, second = stream.split(value, [4, 6])
    assert [t.shape[0] for t in first] == [4, 4] and torch.equal(second[1][:, 0], torch.arange(4.0, 10.0) * 2)
    kept = stream.reduce(first, Reduction.keep(torch.tensor([3, 0])))
    assert torch.equal(kept[0][:, 0], torch.tensor([0.0, 3.0]))
    groups = torch.tensor([0, 0, 1, -1, -1, -1])
    merged = Reduction(index=torch.tensor([0, -1]), tokens=torch.zeros(2, 1), groups=groups)
    rows = stream.reduce(second, merged)  # row 0: mean of tokens 0, 1; row 1: token 2; 3-5 dropped
    assert torch.equal(rows[1][:, 0], torch.tensor([9.0, 12.0]))
    assert stream.reduce(second, None) is second
    packed = stream.pack([kept, rows])
    assert [t.shape[0] for t in packed] == [4, 4] and torch.equal(packed[1][2:, 0], torch.tensor([9.0, 12.0]))


def test_token_streams_are_packed_with_the_tokens():
    """``pack`` puts each image's reduced stream rows into the feature output the stock model receives."""
    modality = types.SimpleNamespace(name="image", pack_features=lambda output, items: {"pooler_output": items})
    adapter = types.SimpleNamespace(modalities=[modality], token_streams=(TokenStream("deepstack"),))
    images = [
        types.SimpleNamespace(modality="image", tokens=torch.randn(n, 3), layout=Layout.grid(1, n)) for n in (4, 2)
    ]
    streams = [{"deepstack": torch.arange(4.0)[:, None]}, {"deepstack": torch.arange(4.0, 6.0)[:, None]}]
    encoded = Encoded(images, [(0, 0), (1, 0)], {"image": None}, None, streams)
    out = pack(adapter, encoded, [Reduction.keep(torch.tensor([1, 3])), None])["image"]
    assert torch.equal(out["deepstack"][:, 0], torch.tensor([1.0, 3.0, 4.0, 5.0]))
    assert torch.equal(out["pooler_output"][0], images[0].tokens[[1, 3]])


def test_a_stream_already_split_per_image_keeps_that_shape():
    """Qwen3-VL's feature function returns each DeepStack level as a tuple with one tensor per image."""
    stream = TokenStream("deepstack_features", per_item=True)
    value = [tuple(torch.arange(float(n))[:, None] + 10 * level for n in (4, 2)) for level in range(3)]
    first, second = stream.split(value, [4, 2])
    assert len(first) == 3 and torch.equal(first[2][:, 0], torch.arange(4.0) + 20)
    kept = stream.reduce(first, Reduction.keep(torch.tensor([1, 3])))
    packed = stream.pack([kept, second])
    assert isinstance(packed, list) and all(isinstance(level, tuple) and len(level) == 2 for level in packed)
    assert torch.equal(packed[1][0][:, 0], torch.tensor([11.0, 13.0])) and torch.equal(packed[1][1], second[1])
    with pytest.raises(ValueError, match="rows per image \\[4, 2\\] do not match the visual tokens \\[3, 3\\]"):
        stream.split(value, [3, 3])
