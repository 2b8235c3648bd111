"""BERT exports for devices: `--target mobile` writes the ORT-format copy and its operator list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_bert import write_tiny_bert

import edgelm
from conftest import export_to
from edgelm.artifact import MANIFEST_NAME

TEXTS = ["the cat sat on the mat", "a big red house", "ok"]


@pytest.fixture(scope="session")
def classifier_mobile(tmp_path_factory) -> Path:
    source = write_tiny_bert(tmp_path_factory.mktemp("bert-mobile") / "cls", "classify")
    return export_to(source, tmp_path_factory.mktemp("art") / "cls-int8-mobile", quant="int8", target="mobile")


def test_ort_copy_is_listed_validated_and_classifies_as_the_onnx_file(classifier_mobile):
    manifest = json.loads((classifier_mobile / MANIFEST_NAME).read_text())
    model = manifest["model"]
    assert (model["ort_file"], model["ort_operators"]) == ("model.ort", "model.required_operators.config")
    assert {"model.ort", "model.required_operators.config"} <= set(manifest["files"])
    checks = {c["name"]: c for c in manifest["validation"]}
    assert checks["max_abs_diff_ort_vs_onnx"]["passed"] and manifest["validation_passed"]
    config = (classifier_mobile / "model.required_operators.config").read_text()
    assert "ai.onnx;" in config and "MatMulInteger" in config  # int8 kernels a reduced build must keep
    with edgelm.load(classifier_mobile) as onnx_model, edgelm.load(classifier_mobile, model_format="ort") as ort_model:
        np.testing.assert_allclose(ort_model.logits(TEXTS), onnx_model.logits(TEXTS), atol=1e-5)
        assert ort_model.classify(TEXTS) == onnx_model.classify(TEXTS)
