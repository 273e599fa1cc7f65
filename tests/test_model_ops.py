"""What users do to a compressed model besides calling it: torch.compile, copy.deepcopy, training (gradients, labels).

The behaviour is documented in docs/design.md ("torch.compile, deepcopy, gradients").
"""

import copy
import logging
import warnings

import pytest
import torch

import vtc
from vtc.testing import IMAGE_TOKEN, llava_inputs, tiny_llava

from .conftest import TOL

BATCH = ((3, 4), (5, 2))


@pytest.fixture(autouse=True)
def _quiet_dynamo():
    torch._logging.set_logs(dynamo=logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._logging.set_logs()
    torch._dynamo.reset()


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- torch.compile ------------------------------------------------------------------------------------------


def test_torch_compile_of_a_compressed_model_runs_vtc_eagerly_and_equals_eager():
    """torch.compile(model) compiles the stock code between vtc's steps (which run as they are): same logits, and
    the in-LLM prune still acts (``backend="eager"``: dynamo's capture without a code generator, so exact)."""
    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, BATCH, seed=1)
    vtc.compress(model, "fastv", budget=0.25)
    with torch.no_grad():
        ref = model(**inputs).logits
        compiled = torch.compile(model, backend="eager")
        out = compiled(**inputs).logits
    assert torch.equal(out, ref)
    assert vtc.last_record(model).images[0].counts["llm_layer_2"] == 4
    vtc.restore(model)


def test_torch_compile_fullgraph_says_why_and_names_the_alternative():
    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, BATCH, seed=1)
    vtc.compress(model, "divprune", budget=0.25)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with pytest.raises(Exception, match=r"language_model.compile\(fullgraph=True\)"):
            torch.compile(model, backend="eager", fullgraph=True)(**inputs)
        # the alternative it names: the language model alone, one graph, same tokens
        model.model.language_model.compile(backend="eager", fullgraph=True)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref)
    vtc.restore(model)


# -- copy.deepcopy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fastv", "tome", "hired"])
def test_deepcopy_is_compressed_the_same_way_by_a_session_of_its_own(method):
    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, BATCH, seed=1)
    with torch.no_grad():
        stock = model(**inputs).logits
    own = _hooks(model)  # transformers' own
    vtc.compress(model, method, budget=0.25)
    mine = model.model.language_model.layers[0].register_forward_hook(lambda *a: None)  # a user's hook
    with torch.no_grad():
        ref = model(**inputs).logits
    record = vtc.last_record(model)

    twin = copy.deepcopy(model)
    assert vtc.is_compressed(twin) and vtc.session_of(twin) is not vtc.session_of(model)
    assert _hooks(twin) == _hooks(model)  # vtc's hooks once (the copy's own), the user's hook copied
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, ref)
    assert vtc.last_record(model) is record  # the copy's calls are recorded on the copy
    assert vtc.last_record(twin) is not record

    vtc.restore(model)  # the copy does not depend on the original
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, ref)
        assert torch.equal(model(**inputs).logits, stock)
    vtc.restore(twin)
    assert type(twin).__name__ == "LlavaForConditionalGeneration" and _hooks(twin) == own + 1
    assert all(type(b).__name__ == "CLIPEncoderLayer" for b in twin.model.vision_tower.encoder.layers)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, stock)
    mine.remove()


# -- gradients ----------------------------------------------------------------------------------------------


def _labels(inputs):
    labels = inputs["input_ids"].clone()
    labels[(inputs["attention_mask"] == 0) | (labels == IMAGE_TOKEN)] = -100
    return labels


def test_gradients_reach_the_projector_as_feeding_the_kept_embeddings_by_hand():
    """A pre-LLM selection with gradients on: the loss and the projector's gradient equal the stock model's
    fed only the kept features (invariant 5, with autograd)."""
    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, ((3, 4),), seed=1)
    labels = _labels(inputs)
    projector = model.model.multi_modal_projector.linear_1.weight
    with vtc.compressed(model, "divprune", budget=0.25):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        rec = vtc.last_record(model)
    grad, projector.grad = projector.grad.clone(), None
    assert grad.abs().sum() > 0

    (im,) = rec.images
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN).nonzero()[0])
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    embed = model.get_input_embeddings()
    seq = torch.cat([embed(ids[:start]), feats[torch.tensor(im.kept)], embed(ids[start + im.num_input :])])[None]
    keep = torch.tensor(rec.samples[0].source_positions)
    by_hand = model(
        inputs_embeds=seq, position_ids=torch.tensor([rec.samples[0].position_ids]), labels=labels[:, keep]
    )
    by_hand.loss.backward()
    torch.testing.assert_close(loss, by_hand.loss, atol=TOL["logits_fp32"], rtol=0)
    torch.testing.assert_close(grad, projector.grad, atol=TOL["logits_fp32"], rtol=0)


@pytest.mark.parametrize("method", ["fastv", "pdrop", "todre"])
def test_labels_with_in_llm_pruning_give_the_loss_of_the_rows_left(method):
    """Rows dropped inside the LLM leave fewer logits than labels: the loss is the causal-LM loss over the rows
    the logits have, each with its own input position's label."""
    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, BATCH, padding_side="right", seed=1)
    labels = _labels(inputs)
    opts = {"layer": 2, "tau": 1.0} if method == "todre" else {}
    with vtc.compressed(model, method, budget=0.25, **opts):
        out = model(**inputs, labels=labels)
        rec = vtc.last_record(model)
        out.loss.backward()
    logits = out.logits
    assert logits.shape[1] < inputs["input_ids"].shape[1]
    rows = torch.tensor([s.source_positions for s in rec.samples])
    target = torch.where(rows >= 0, labels.gather(1, rows.clamp_min(0)), -100)
    by_hand = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, by_hand, atol=TOL["logits_fp32"], rtol=0)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
