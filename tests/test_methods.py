"""Hand-checked selections: each method on small constructed inputs with a known answer."""

import itertools
import math

import pytest
import torch

import vtc
from vtc.contexts import ImageTokens, Layout, TowerInfo, VisionSignal
from vtc.grids import band_cells
from vtc.pruners.fopru import row_select
from vtc.pruners.mmtok import coverage_matrix, greedy_coverage

TOWER = TowerInfo(has_cls=True, num_blocks=4)


def method(name, **options):
    info = vtc.get_method(name)
    return info.method_class(info.config_class(**options))


def image(rows=4, cols=4, k=4, dim=8, prefix=1, signals=None, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    return ImageTokens(
        tokens=torch.randn(n, dim, generator=g),
        layout=Layout.grid(rows, cols, prefix=prefix),
        k=k,
        signals=signals or {},
        vision_tokens=kw.pop("vision_tokens", torch.randn(n, dim, generator=g)),
        text_ids=torch.zeros(0, dtype=torch.long),
        text_embeds=kw.pop("text_embeds", torch.zeros(0, dim)),
        project=kw.pop("project", lambda x: x),
    )


def test_hired_keeps_top_final_layer_cls_attention():
    scores = torch.tensor(
        [0.5, 0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.7, 0.6, 0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.07, 0.08]
    )
    sig = VisionSignal("cls_attention", "feature", heads="sum")
    m = method("hired")
    assert m.vision_signals(TOWER) == (sig,)  # one partition: no budget split, no early-layer signal
    crops = TowerInfo(has_cls=True, num_blocks=4, crops=True)
    assert m.vision_signals(crops) == (sig, VisionSignal("cls_attention", 0, heads="sum"))
    red = m.reduce(image(k=4, signals={sig.name: scores[None]}))
    # slot 0 is CLS (0.5, never a candidate); patches are slots 1..16 -> tokens 0..15
    assert red.index.tolist() == [1, 3, 6, 7]  # slots 2 (0.9), 4 (0.8), 7 (0.7), 8 (0.6)


def test_hired_on_a_cls_free_tower_uses_attention_received():
    m = method("hired")
    final, early = m.vision_signals(TowerInfo(has_cls=False, num_blocks=4, crops=True))
    assert final.kind == early.kind == "attention_received" and early.layer == 0


@pytest.mark.parametrize("significance", ["received", "cls"])
def test_fopru_rank(significance):
    kind = "attention_received" if significance == "received" else "cls_attention"
    sig = VisionSignal(kind, "feature")
    scores = torch.arange(17, dtype=torch.float).flip(0)[None]  # slot 1 (token 0) highest after CLS
    red = method("fopru", significance=significance).reduce(image(k=5, signals={sig.name: scores}))
    assert red.index.tolist() == [0, 1, 2, 3, 4]


def test_fopru_row_keeps_best_rows_then_best_tokens_of_next_row():
    grid = torch.tensor([[1.0, 1, 1, 1], [9, 0, 0, 0], [5, 5, 5, 5], [4, 4, 4, 8]])
    # row means: 1, 2.25, 5, 5 -> rows 2 and 3 (ties to the lower index: 2 first), then row 1's best
    assert row_select(grid, 4).tolist() == [8, 9, 10, 11]
    assert row_select(grid, 9).tolist() == [4, 8, 9, 10, 11, 12, 13, 14, 15]
    assert row_select(grid, 2).tolist() == [8, 9]


def test_fopru_row_through_the_method():
    sig = VisionSignal("attention_received", "feature")
    grid = torch.tensor([[1.0, 1, 1, 1], [9, 0, 0, 0], [5, 5, 5, 5], [4, 4, 4, 8]]).flatten()
    scores = torch.cat([torch.tensor([100.0]), grid])[None]
    red = method("fopru", strategy="row").reduce(image(k=6, signals={sig.name: scores}))
    assert red.index.tolist() == [8, 9, 10, 11, 12, 15]


def test_divprune_picks_the_diverse_tokens():
    # three tight clusters plus one isolated direction: k=4 takes one from each
    angles = torch.tensor([0.0, 0.01, 0.02, 1.5, 1.51, 3.0, 3.01, 4.5, 0.03])
    tokens = torch.stack([angles.cos(), angles.sin()], 1)
    img = image(rows=3, cols=3, k=4, dim=2)
    img.tokens = tokens
    kept = method("divprune").reduce(img).index.tolist()
    assert sorted(int(angles[i] // 1.4) for i in kept) == [0, 1, 2, 3]
    assert len(set(kept)) == 4


def _brute_coverage(cov, k):
    best = torch.zeros(cov.shape[0])
    picks = []
    for _ in range(k):
        gains = []
        for j in range(cov.shape[1]):
            gains.append(-math.inf if j in picks else float(torch.clamp(cov[:, j] - best, min=0).sum()))
        j = max(range(len(gains)), key=lambda i: (gains[i], -i))
        picks.append(j)
        best = torch.maximum(best, cov[:, j])
    return picks


@pytest.mark.parametrize("seed", range(3))
def test_mmtok_greedy_is_the_coverage_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.randn(12, 6, generator=g), torch.randn(12, 5, generator=g), torch.randn(3, 6, generator=g)
    cov = coverage_matrix(x, y, z, 0.5, 0.02, 0.2)
    assert cov.shape == (15, 12)
    torch.testing.assert_close(cov[:3].sum(), torch.tensor(1.0))  # text rows spread unit mass
    torch.testing.assert_close(cov[3:].sum(), torch.tensor(0.5))  # alpha * vision rows
    assert greedy_coverage(cov, 5).tolist() == _brute_coverage(cov, 5)


def test_mmtok_text_pulls_in_the_matching_token():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(16, 8, generator=g)
    text = tokens[11:12] * 3.0  # a text token pointing exactly at visual token 11
    img = image(k=1, dim=8, text_embeds=text)
    img.tokens = tokens
    assert method("mmtok", alpha=0.01).reduce(img).index.tolist() == [11]


def test_random_is_seeded_and_batch_independent():
    img = image(rows=6, cols=6, k=9)
    a, b = method("random", seed=3).reduce(img), method("random", seed=3).reduce(img)
    c = method("random", seed=4).reduce(img)
    assert a.index.tolist() == b.index.tolist() != c.index.tolist()
    assert a.index.tolist() == sorted(set(a.index.tolist()))


def test_uniform_is_an_even_grid():
    assert method("uniform").reduce(image(k=4)).index.tolist() == [0, 2, 8, 10]
    red = method("uniform").reduce(image(rows=24, cols=24, k=144))
    rows, cols = (red.index // 24).unique(), (red.index % 24).unique()
    assert rows.tolist() == list(range(0, 24, 2)) and cols.tolist() == list(range(0, 24, 2))


@pytest.mark.parametrize("rows, cols", [(4, 4), (24, 24), (3, 7), (1, 5), (6, 2)])
def test_band_cells_partition_the_grid_into_exactly_k(rows, cols):
    for k in range(1, rows * cols + 1):
        cells = band_cells(rows, cols, k)
        assert len(cells) == k
        cover = torch.zeros(rows, cols, dtype=torch.long)
        for r0, r1, c0, c1 in cells:
            assert r1 > r0 and c1 > c0
            cover[r0:r1, c0:c1] += 1
        assert bool((cover == 1).all()), (rows, cols, k)


def test_pool_averages_each_cell_in_vision_space():
    img = image(k=4)
    red = method("pool").reduce(img)
    assert red.index.tolist() == [0, 2, 8, 10]
    expect = img.vision_tokens.view(2, 2, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(4, 4, -1).mean(1)
    torch.testing.assert_close(red.tokens, expect)
    assert red.groups.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    llm = method("pool", space="llm").reduce(img)
    torch.testing.assert_close(llm.tokens[0], img.tokens[[0, 1, 4, 5]].mean(0))


def test_visionzip_dominant_plus_contextual_by_hand():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 17, 8, generator=g)
    keys = torch.randn(1, 17, 4, generator=g)
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.2, 0.3, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    sig = {"cls_attention@feature:sum": scores, "keys@feature": keys, "hidden@feature": hidden}
    img = image(k=4, signals=sig)
    img.tokens = hidden[0, 1:] * 2  # "projected" tokens: any function of hidden works for the check
    red = method("visionzip", contextual=0.25).reduce(img)
    # k=4: C = floor(4 * 0.25 + .5) = 1 contextual, D = 3 dominant = CLS + 2 best patches (slots 1, 7)
    assert red.index.tolist() == [-1, 0, 6, 1]
    torch.testing.assert_close(red.tokens[0], hidden[0, 0])  # CLS through the (identity) projector
    torch.testing.assert_close(red.tokens[1], img.tokens[0])
    torch.testing.assert_close(red.tokens[2], img.tokens[6])
    rest = [s for s in range(1, 17) if s not in (1, 7)]  # target = rest[0] = slot 2, all others join it
    expect = hidden[0, rest[0]] + hidden[0, rest[1:]].mean(0)
    torch.testing.assert_close(red.tokens[3], expect)
    assert red.groups.tolist() == [1] + [3] * 5 + [2] + [3] * 9


def test_visionzip_assigns_members_to_the_most_similar_target():
    from vtc.mergers.visionzip import contextual_merge

    hidden = torch.arange(6, dtype=torch.float)[:, None].repeat(1, 2)
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1], [1, 0.2], [0.2, 1]])
    tokens, targets, member_of = contextual_merge(hidden, keys, torch.arange(6), 2)
    assert targets.tolist() == [0, 3]  # step = 6 // 2 = 3
    assert member_of.tolist() == [0, 1, 0, 1, 0, 1]
    torch.testing.assert_close(tokens[0], hidden[0] + hidden[[2, 4]].mean(0))
    torch.testing.assert_close(tokens[1], hidden[3] + hidden[[1, 5]].mean(0))


def test_layout_helpers():
    lay = Layout.grid(2, 3, prefix=1)
    assert lay.num_tokens == 6 and lay.is_patch().all()
    assert lay.grid_position().tolist() == [[r, c] for r, c in itertools.product(range(2), range(3))]
    assert lay.partition_tokens(0).tolist() == list(range(6))
    full = Layout.grid(2, 3, prefix=1, include_prefix=True)
    assert full.num_tokens == 7 and full.is_patch().tolist() == [False] + [True] * 6


def test_hired_allocation_by_hand():
    from vtc.pruners.hired import hired_allocation

    early = torch.zeros(16)
    early[[0, 1, 2, 3, 4, 5, 8, 12]] = torch.arange(8, 0, -1).float()  # the 8 = floor(16 * 0.5) salient cells
    caps = [16, 16, 16, 16]
    # code mapping: chunks of 4 raster cells -> counts [4, 2, 1, 1]; B0 = 5, B_sub = 5
    # quotas 2.5, 1.25, .625, .625 -> floors 2, 1, 0, 0; leftover 2 to the largest remainders (crops 2, 3)
    assert hired_allocation(10, 0.5, early, (4, 4), (2, 2), 16, caps, "code") == [5, 2, 1, 1, 1]
    # spatial mapping: quadrants -> counts [4, 2, 2, 0]; floors 2, 1, 1, 0; leftover 1 to crop 0
    assert hired_allocation(10, 0.5, early, (4, 4), (2, 2), 16, caps, "spatial") == [5, 3, 1, 1, 0]
    # a crop with little room after unpadding passes its share to the others; the sum stays k
    assert hired_allocation(10, 0.5, early, (4, 4), (2, 2), 16, [1, 16, 16, 16], "code") == [5, 1, 2, 1, 1]
    # crops too small for their share: the rest goes back to the full image
    assert sum(hired_allocation(30, 0.5, early, (4, 4), (2, 2), 16, [2, 2, 2, 2], "code")) == 24


@pytest.mark.parametrize(
    "name",
    sorted(
        m.name for m in vtc.list_methods() if vtc.Stage.PRE_LLM in m.stages and "image" in m.method_class.modalities
    ),
)
def test_a_method_whose_selection_follows_the_prompt_says_so(name):
    """``reads_prompt`` decides whether one compressed prefix may serve every question about an image (the
    accuracy runner's shared prefix): a method whose selection changes with the prompt text must declare it."""
    info = vtc.get_method(name)
    m = info.method_class(info.config_class(budget=0.25))
    sigs = {}
    g = torch.Generator().manual_seed(1)
    for sig in m.vision_signals(TOWER):
        shape = (1, 17) if sig.kind in ("cls_attention", "attention_received") else (1, 17, 8)
        sigs[sig.name] = torch.rand(shape, generator=g)
    picks = []
    for seed in range(4):
        t = torch.Generator().manual_seed(100 + seed)
        img = image(k=4, signals=sigs, text_embeds=torch.randn(3, 8, generator=t))
        picks.append(m.reduce(img).index.tolist())
    if any(p != picks[0] for p in picks):
        assert info.method_class.reads_prompt, f"{name} selects differently for different prompts"


@pytest.mark.parametrize("seed", range(3))
def test_mmtok_lazy_coverage_is_the_matrix_greedy(seed):
    """Large images skip the (n + m) x n matrix: columns on demand, lazy greedy; the picks are the same."""
    from vtc.pruners.mmtok import lazy_coverage

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 5, generator=g)
    y = centres[torch.randint(0, 6, (90,), generator=g)] + 0.1 * torch.randn(90, 5, generator=g)
    x, z = torch.randn(90, 6, generator=g), torch.randn(4, 6, generator=g)
    import vtc.pruners.mmtok as mmtok

    chunk, mmtok._CHUNK = mmtok._CHUNK, 90 * 7  # seven columns (and rows) per block
    try:
        for text in (z, None):
            cov = coverage_matrix(x, y, text, 0.5, 0.02, 0.2)
            assert lazy_coverage(x, y, text, 0.5, 0.02, 0.2, 20).tolist() == greedy_coverage(cov, 20).tolist()
    finally:
        mmtok._CHUNK = chunk
