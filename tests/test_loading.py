"""Model specs: tiny:FAMILY offline, and the real from_pretrained path on local files."""

from __future__ import annotations

import pytest
import torch

from attnkit import testing
from attnkit.loading import ModelLoadError, load_model


def test_tiny_spec():
    model, processor = load_model("tiny:gemma3")
    assert model.config.model_type == "gemma3" and not model.training
    assert processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_from_pretrained_on_local_files(tmp_path, family):
    model, inputs = testing.tiny_model(family)
    model.save_pretrained(tmp_path)
    testing.tiny_processor(family).save_pretrained(tmp_path)
    loaded, processor = load_model(str(tmp_path), dtype="float32")
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    again = testing.tiny_inputs(family, processor=processor)
    assert torch.equal(again["input_ids"], inputs["input_ids"])


def test_bad_specs():
    with pytest.raises(ModelLoadError, match=r"unknown tiny family 'nope' \(valid: llava"):
        load_model("tiny:nope")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model("/nonexistent/model/dir")
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        load_model("/nonexistent", dtype="fp8")
