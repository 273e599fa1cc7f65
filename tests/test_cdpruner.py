"""CDPruner: relevance and greedy MAP follow the official code (written here with its dense kernel), on a hand-made
example, on random inputs, and end to end on a tiny LLaVA."""

import pytest
import torch

import vtc
from vtc.pruners.cdpruner import dpp_greedy, instruction_relevance
from vtc.testing import llava_inputs, tiny_llava


def reference(features, text, k):
    """The official ``encode_images`` with its dense kernel (one image)."""
    x = features / features.norm(dim=-1, keepdim=True)
    similarity = x @ x.T
    t = text / text.norm(dim=-1, keepdim=True)
    relevance = (-(x @ t.T)).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    n = x.shape[0]
    cis = torch.zeros(k, n)
    di2s = torch.diagonal(kernel).clone()
    picked = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picked.append(j)
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = e
        di2s -= e * e
        di2s[j] = -float("inf")
    return sorted(picked)


def test_hand_made_example():
    # equal relevance; tokens 0 and 1 are the same direction, 2 and 3 orthogonal to it and to each other
    features = torch.tensor([[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0, 0, 1.0]])
    r = torch.ones(4)
    picked = dpp_greedy(features, r, 3)
    assert sorted(picked.tolist()) == [0, 2, 3] or sorted(picked.tolist()) == [1, 2, 3]  # never both duplicates
    assert not {0, 1} <= set(picked.tolist())
    # relevance decides between duplicates: the more relevant copy is the one kept
    picked = dpp_greedy(features, torch.tensor([0.5, 1.0, 0.9, 0.8]), 3)
    assert sorted(picked.tolist()) == [1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_selection_equals_the_official_dense_kernel_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    features, text = torch.randn(40, 24, generator=gen), torch.randn(6, 24, generator=gen)
    r = instruction_relevance(features, text)
    for k in (3, 10, 20):
        assert sorted(dpp_greedy(features, r, k).tolist()) == reference(features, text, k)


@pytest.mark.parametrize("seed", range(3))
def test_the_factored_inference_picks_as_the_dense_one_up_to_the_rank(seed):
    """The per-pick vectors are kept as D-dimensional factors (no k x n matrix): the same picks, in order, as the
    official dense recursion for every k up to the kernel's rank (the feature width)."""
    gen = torch.Generator().manual_seed(seed)
    features, text = torch.randn(200, 16, generator=gen), torch.randn(5, 16, generator=gen)
    r = instruction_relevance(features, text)
    assert sorted(dpp_greedy(features, r, 16).tolist()) == reference(features, text, 16)


def test_rank_exhausted_falls_back_to_relevance():
    features = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # rank 2: only two DPP picks possible
    r = torch.tensor([0.2, 0.3, 1.0, 0.9])
    picked = dpp_greedy(features, r, 4)
    assert sorted(picked.tolist()) == [0, 1, 2, 3] and picked[:2].tolist() == [2, 3]


def test_end_to_end_on_a_tiny_llava():
    model = tiny_llava(seed=2)
    inputs = llava_inputs(model, ((2, 5),), seed=3)
    with vtc.compressed(model, "cdpruner", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    im = rec.images[0]
    ids = inputs["input_ids"][0]
    visual = ids == model.config.image_token_id
    after = ids[int(torch.nonzero(visual).flatten()[-1]) + 1 :]
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        text = model.get_input_embeddings()(after)
    assert sorted(im.kept) == reference(tokens, text, vtc.keep_count(0.25, tokens.shape[0]))
