"""Zero-shot heads against an independent computation; their cache keyed by the base.

The expected head is CLIP's prompt ensemble written out here text by text: the mean of the unit
text embeddings of every template, renormalised, times exp(logit_scale).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY
from tvtool.errors import InvalidInputError
from tvtool.evaluate import (
    EvalConfig,
    EvalSettings,
    clear_memory_cache,
    evaluate,
    head_key,
    zero_shot_head,
)
from tvtool.models import build_zero_shot_head, heads, load_clip

CLASSES = ("circle", "square", "triangle", "star")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "{}, small and blurry.")


@pytest.fixture(scope="module")
def bundle():
    return load_clip(TINY)


def _expected(bundle, classnames, templates) -> torch.Tensor:
    model = bundle.model.eval()
    rows = []
    with torch.no_grad():
        for name in classnames:
            units = [F.normalize(model.encode_text(bundle.tokenizer([t.format(name)])).float()[0],
                                 dim=0) for t in templates]  # one text at a time
            rows.append(F.normalize(torch.stack(units).mean(0), dim=0))
        return model.logit_scale.exp().float() * torch.stack(rows)


def test_head_is_the_prompt_ensemble(bundle):
    head = build_zero_shot_head(bundle, CLASSES, TEMPLATES)
    expected = _expected(bundle, CLASSES, TEMPLATES)
    assert head.shape == expected.shape
    torch.testing.assert_close(head, expected, rtol=1e-5, atol=1e-5)
    # The ensemble matters: one template alone gives another head.
    assert not torch.allclose(head, _expected(bundle, CLASSES, TEMPLATES[:1]), atol=1e-3)


def test_cached_head_is_the_prompt_ensemble(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    key = head_key("sha256:base", "shapes", CLASSES, TEMPLATES)
    head = zero_shot_head(bundle, key, TEMPLATES, disk_cache=False)
    torch.testing.assert_close(head, _expected(bundle, CLASSES, TEMPLATES), rtol=1e-5,
                               atol=1e-5)
    clear_memory_cache()


def test_prompts_are_encoded_in_bounded_batches(bundle, monkeypatch):
    # 4 classes x 3 templates = 12 prompts, at most 5 per forward pass: the memory of a head
    # no longer grows with the number of templates (64,000 of them took > 6 GB).
    sizes: list[int] = []
    tokenizer = bundle.tokenizer

    def counting(texts):
        sizes.append(len(texts))
        return tokenizer(texts)

    monkeypatch.setattr(heads, "TEXTS_PER_BATCH", 5)
    monkeypatch.setattr(bundle, "_tokenizer", counting)
    head = build_zero_shot_head(bundle, CLASSES, TEMPLATES)
    assert sizes == [5, 5, 2]
    monkeypatch.setattr(bundle, "_tokenizer", tokenizer)
    torch.testing.assert_close(head, _expected(bundle, CLASSES, TEMPLATES), rtol=1e-5,
                               atol=1e-5)


def test_classes_the_tokenizer_cannot_tell_apart_are_refused(bundle):
    # CLIP's tokenizer lower-cases: 'Cat' and 'cat' give identical prompts and rows.
    with pytest.raises(InvalidInputError, match=r"classes 0 \('Cat'\) and 2 \('cat'\)"):
        build_zero_shot_head(bundle, ("Cat", "dog", "cat"), TEMPLATES)


def test_head_cache_keeps_bases_apart(files):
    # Two bases evaluated in one process (the in-memory head cache warm): each gives what a
    # fresh process gives. A cache keyed without the base would hand the second base the
    # first one's head.
    bases = [f"{TINY}:random", TINY, files["base"]]  # files["base"]: the random weights again
    dataset = "synthetic:shape"

    def run(base: str) -> tuple[float, list[float]]:
        report = evaluate(EvalConfig(EvalSettings(base=base, limit=48, device="cpu",
                                                  cache_heads=False), datasets=(dataset,)))
        from tvtool.evaluate import open_eval_data, open_eval_model
        from tvtool.evaluate.accuracy import build_heads

        with open_eval_model(base, []) as model:
            data = open_eval_data(dataset, "test", model.bundle.preprocess_eval, limit=4)
            head = build_heads(model, [data], device=model.device, cache=False)[data.name]
        return report.results[0].accuracy, head[:, 0].tolist()

    fresh = []
    for base in bases:
        clear_memory_cache()
        fresh.append(run(base))
    clear_memory_cache()
    warm = [run(base) for base in bases]  # one process, the memory cache shared
    assert warm == fresh
    assert fresh[0] == fresh[2] and fresh[0][1] != fresh[1][1], "the two bases' heads differ"
    clear_memory_cache()
