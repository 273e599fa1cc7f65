"""AIM: the merge rounds and the PageRank importance follow the official code (re-implemented here from it), and
the in-LLM selection equals PageRank over the layer's own attention map computed by the stock eager model."""

import math

import pytest
import torch

import vtc
from vtc.contexts import ImageTokens, Layout
from vtc.mergers.aim import bipartite_merge, pagerank
from vtc.testing import compressed_inputs, llava_inputs, tiny_llava


def official_round(x: torch.Tensor, r: int) -> torch.Tensor:
    """dragonlzm/AIM ``bipartite_soft_matching_merge`` on ``x [1, t, c]`` (metric = x), as its code computes it."""
    t = x.shape[1]
    r = min(r, t // 2)
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="mean")
    return torch.cat([unm, dst], dim=1)


def official_importance(logits: torch.Tensor, tau=0.1, iters=5) -> torch.Tensor:
    """``get_importance`` of the forked qwen2 model: ``[B, H, N, N]`` logits -> ``[B, N]``."""
    bsz, heads, n, _ = logits.shape
    m = torch.softmax(logits / tau, dim=-1, dtype=torch.float32)
    dist = torch.ones(bsz, heads, 1, n) / n
    for _ in range(iters):
        dist = dist @ m
    return dist.pow(2).mean(dim=1).pow(0.5).view(bsz, n)


@pytest.mark.parametrize(("t", "r"), [(16, 8), (16, 3), (15, 7), (9, 2), (64, 32)])
def test_one_round_is_the_official_merge(t, r):
    x = torch.randn(t, 12, generator=torch.Generator().manual_seed(t + r))
    merged, row, stands = bipartite_merge(x, r)
    torch.testing.assert_close(merged, official_round(x[None], r)[0])
    unmerged = t - (t // 2) - min(r, t // 2)  # sources left alone come first, then every destination in place
    assert stands[unmerged:].tolist() == list(range(1, t, 2)) and all(s % 2 == 0 for s in stands[:unmerged].tolist())
    for j in range(merged.shape[0]):  # every output row is the plain mean of the input tokens that ended in it
        torch.testing.assert_close(merged[j], x[row == j].mean(0))
        assert row[stands[j]] == j


def test_budget_quarter_is_the_official_two_rounds_per_frame():
    g = torch.Generator().manual_seed(0)
    frames, rows, cols, dim = 3, 4, 4, 8
    tokens = torch.randn(frames * rows * cols, dim, generator=g)
    grid = Layout.grid(rows, cols)
    layout = Layout(
        [(rows, cols)] * frames,
        0,
        torch.arange(frames).repeat_interleave(rows * cols),
        grid.slot.repeat(frames),
        None,
    )
    image = ImageTokens(tokens=tokens, layout=layout, k=12, modality="video")
    red = vtc.get_method("aim").method_class(vtc.get_method("aim").config_class(budget=0.25)).reduce(image)
    expected = []
    for f in range(frames):  # official get_2dPool: r = N // 2, then r = N // 4, per frame
        x = tokens[f * 16 : (f + 1) * 16][None]
        expected.append(official_round(official_round(x, 8), 4)[0])
    torch.testing.assert_close(red.tokens, torch.cat(expected))
    groups = red.resolve_groups(image.n)
    for j in range(12):  # anchors lie in their own group, and groups stay inside one frame
        members = torch.nonzero(groups == j).flatten()
        assert groups[red.index[j]] == j and len(set((members // 16).tolist())) == 1
    # two rounds of r = t / 2: every output stands at a destination of a destination (place 3 mod 4)
    assert all(i % 4 == 3 for i in (red.index % 16).tolist())


def test_pagerank_is_the_official_importance():
    g = torch.Generator().manual_seed(1)
    n = 10
    logits = torch.randn(2, 4, n, n, generator=g)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    official = official_importance(logits.masked_fill(~causal, torch.finfo(torch.float32).min))
    ours = torch.stack([pagerank(lg.masked_fill(~causal, -math.inf), 0.1, 5).pow(2).mean(0).sqrt() for lg in logits])
    torch.testing.assert_close(ours, official)


def test_in_llm_selection_is_pagerank_of_the_layers_attention_map():
    """The rows kept at layer 3 of the tiny 4-layer model are the top floor(n * 0.875) visual rows by PageRank over
    layer 2's attention, which the stock eager model returns for the merged prompt (softmax(log p / tau) =
    softmax(logits / tau): a row's constant shift cancels)."""
    model = tiny_llava(seed=4, attn_implementation="eager")
    inputs = llava_inputs(model, ((6, 4),), padding_side="left", seed=2)
    with vtc.compressed(model, "aim", budget=0.5):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
        short = compressed_inputs(model, inputs)
    with torch.no_grad():
        out = model(**short, output_attentions=True)
    probs = out.attentions[2][0]  # [H, L, L] of layer 2, which runs on every merged row
    m = torch.softmax(probs.log() / 0.1, dim=-1)
    d = torch.full((probs.shape[0], 1, probs.shape[-1]), 1.0 / probs.shape[-1])
    for _ in range(5):
        d = d @ m
    score = d[:, 0].pow(2).mean(0).sqrt()
    visual = torch.nonzero(short["input_ids"][0] == model.config.image_token_id).flatten()
    (im,) = rec.images
    k = math.floor(len(im.kept) * 0.875)
    top = visual[score[visual].topk(k).indices.sort().values]
    kept_tokens = [im.kept[int(torch.nonzero(visual == row))] for row in top]
    assert im.counts["llm_layer_3"] == k
    assert im.layers["3"] == sorted(kept_tokens)


def test_options_are_checked():
    with pytest.raises(ValueError, match="tau"):
        vtc.get_method("aim").config_class(tau=0.0)
    with pytest.raises(TypeError, match="llm_stage"):
        vtc.get_method("aim").config_class(llm_stage="no")
    aim = vtc.get_method("aim")
    assert aim.method_class(aim.config_class(llm_stage=False)).llm_prune_layers(28) == ()
    # official schedule on 28 layers: ranked after layers 14..21, gone from layer 22 on
    assert aim.method_class(aim.config_class()).llm_prune_layers(28) == tuple(range(15, 23))
