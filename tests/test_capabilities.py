"""What load() returns answers the capability protocols the CLI and the server ask, and only those."""

from __future__ import annotations

import pytest

import edgelm
from edgelm.runtime.capabilities import (
    ChatModel,
    ClassifierModel,
    EmbeddingModel,
    MaskFillingModel,
    TextModel,
    can_chat,
)


@pytest.mark.parametrize("fixture", ["lstm_artifact", "gpt2_int8"])
def test_text_generators_are_text_models_and_nothing_else(fixture, request):
    with edgelm.load(request.getfixturevalue(fixture)) as model:
        assert isinstance(model, TextModel)
        assert not isinstance(model, (EmbeddingModel, MaskFillingModel, ClassifierModel))
        assert not can_chat(model)  # no chat template in these artifacts


def test_a_plain_object_has_no_capability():
    thing = object()
    for protocol in (TextModel, ChatModel, EmbeddingModel, MaskFillingModel, ClassifierModel):
        assert not isinstance(thing, protocol)
    assert not can_chat(thing)
