"""Learning aTLAS coefficients on a tiny open_clip image encoder (tvtool.atlas.learner).

The toy world: a random-init tvtool-tiny image encoder whose matrices are scaled up (so that
images get distinct features), a 4-class task of noisy class patterns, a fixed random head, and
a task vector from a few steps of real fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from tvtool.atlas import (
    ComposedEncoder,
    LearnerConfig,
    Packing,
    TaskData,
    TensorSpec,
    VectorStack,
    build_partition,
    learn,
    split_examples,
)
from tvtool.errors import UsageError
from tvtool.linearize import linearized_forward

CLASSES = 4
# The settings these mechanics tests were calibrated with (the objectives' reference defaults
# add weight decay, clipping and image augmentation, which the noise-pattern toy task does not
# tolerate: a flipped random pattern is another pattern).
# They test tvtool's protocol (held-out selection, early stopping); the reference protocols
# are tested in tests/test_coeffs_protocols.py.
PLAIN = {"augment": "none", "weight_decay": 0.0, "grad_clip": 0.0, "protocol": "tvtool"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine run several times faster on one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Toy:
    encoder: nn.Module
    theta0: dict[str, Tensor]
    specs: list[TensorSpec]
    head: Tensor
    images: Tensor
    labels: Tensor
    tau: dict[str, Tensor]

    def logits(self, params: dict[str, Tensor], images: Tensor) -> Tensor:
        with torch.no_grad():
            feats = functional_call(self.encoder, params, (images,))
        return F.normalize(feats, dim=-1) @ self.head.T

    def accuracy(self, logits: Tensor, labels: Tensor) -> float:
        return float((logits.argmax(-1) == labels).float().mean())

    def moved(self, coef: float) -> dict[str, Tensor]:
        return {n: p + coef * self.tau[f"visual.{n}"] for n, p in self.theta0.items()}

    def composed(self, granularity: str, vectors: list[dict[str, Tensor]] | None = None,
                 linearized: bool = False) -> ComposedEncoder:
        partition = build_partition(self.specs, granularity, seed=0)
        stack = VectorStack(Packing(partition), vectors or [self.tau])
        return ComposedEncoder(self.encoder, stack, linearized=linearized)


def _finetune(encoder: nn.Module, start: dict[str, Tensor],
              tasks: list[tuple[Tensor, Tensor, Tensor]], gen: torch.Generator,
              steps: int = 25) -> dict[str, Tensor]:
    """A few AdamW steps of full fine-tuning on the sum of the tasks' losses."""
    params = {n: p.clone().requires_grad_(True) for n, p in start.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = torch.zeros(())
        for images, labels, head in tasks:
            index = torch.randint(0, len(images), (32,), generator=gen)
            feats = functional_call(encoder, params, (images[index],))
            loss = loss + F.cross_entropy(F.normalize(feats, dim=-1) @ head.T, labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.fixture(scope="module")
def toy(_one_thread) -> Toy:
    from tvtool.models import load_clip

    torch.manual_seed(0)
    encoder = load_clip("tvtool-tiny:random").model.visual
    with torch.no_grad():
        for parameter in encoder.parameters():
            if parameter.ndim >= 2:
                parameter.mul_(3)
    theta0 = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    specs = [TensorSpec(f"visual.{n}", tuple(p.shape)) for n, p in theta0.items()]
    gen = torch.Generator().manual_seed(1)
    patterns = torch.randn(CLASSES, 3, 32, 32, generator=gen)
    labels = torch.arange(480) % CLASSES
    images = patterns[labels] + torch.randn(480, 3, 32, 32, generator=gen)
    head = F.normalize(torch.randn(CLASSES, 64, generator=gen), dim=-1) * 20
    # A quickly fine-tuned task vector: 25 AdamW steps on the first 200 images.
    tuned = _finetune(encoder, theta0, [(images[:200], labels[:200], head)], gen)
    tau = {f"visual.{n}": (tuned[n] - theta0[n]) for n in theta0}
    return Toy(encoder, theta0, specs, head, images, labels, tau)


def _data(toy: Toy, start: int, stop: int, labels: Tensor | None = None) -> TensorDataset:
    return TensorDataset(toy.images[start:stop],
                         (labels if labels is not None else toy.labels)[start:stop])


def test_one_vector_recovers_finetuned_accuracy(toy):
    test_images, test_labels = toy.images[240:], toy.labels[240:]
    base_acc = toy.accuracy(toy.logits(toy.theta0, test_images), test_labels)
    ft_acc = toy.accuracy(toy.logits(toy.moved(1.0), test_images), test_labels)
    assert ft_acc > base_acc + 0.25, "the toy fine-tuning should have learned the task"
    # 8 shots per class from images the vector was not trained on; 2 per class held out.
    train, val = split_examples(toy.labels[200:240], 40, shots=8, val_fraction=0.25, seed=0)
    task = TaskData("toy", toy.head, _data(toy, 200, 240), None)
    task.train = torch.utils.data.Subset(task.train, train)
    task.val = torch.utils.data.Subset(_data(toy, 200, 240), val)
    encoder = toy.composed("tensor")
    result = learn(encoder, [task], LearnerConfig(**PLAIN, steps=30, lr=0.1, batch_size=24,
                                                  eval_every=5))
    with torch.no_grad():
        logits = F.normalize(encoder(result.coefficients, test_images), dim=-1) @ toy.head.T
    learned_acc = toy.accuracy(logits, test_labels)
    assert learned_acc >= ft_acc - 0.08, (base_acc, ft_acc, learned_acc)
    assert result.coefficients.shape == (1, len(toy.specs))
    assert result.history[0]["step"] == 0 and result.best_step > 0
    assert result.best[0]["accuracy"] >= result.initial[0]["accuracy"]


def test_known_scaling_is_recovered(toy):
    gen = torch.Generator().manual_seed(3)
    taus = [{s.name: 0.1 * torch.randn(s.shape, generator=gen)
             * toy.theta0[s.name[len("visual."):]].std().clamp_min(0.05) for s in toy.specs}
            for _ in range(2)]
    images = toy.images[:16]
    target_params = {n: p + 0.7 * taus[0][f"visual.{n}"] - 0.3 * taus[1][f"visual.{n}"]
                     for n, p in toy.theta0.items()}
    with torch.no_grad():
        target = functional_call(toy.encoder, target_params, (images,))
    encoder = toy.composed("task", taus)
    coefficients = torch.zeros(2, 1, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 80)
    for _ in range(80):
        loss = F.mse_loss(encoder(coefficients, images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    torch.testing.assert_close(coefficients.detach().reshape(-1), torch.tensor([0.7, -0.3]),
                               atol=0.02, rtol=0)


def _test_accuracy(toy: Toy, encoder: ComposedEncoder, coefficients: Tensor) -> float:
    with torch.no_grad():
        logits = F.normalize(encoder(coefficients, toy.images[320:]), dim=-1) @ toy.head.T
    return toy.accuracy(logits, toy.labels[320:])


@pytest.mark.parametrize("objective", ["entropy", "infomax", "ufm"])
def test_unlabelled_objectives_do_not_end_below_zero_shot(toy, objective):
    # Labels are all wrong on purpose: the unlabelled objectives must never read them.
    fake = torch.zeros_like(toy.labels)
    task = TaskData("toy", toy.head, _data(toy, 200, 280, fake), _data(toy, 280, 320, fake),
                    labelled=False)
    encoder = toy.composed("layer")
    result = learn(encoder, [task],
                   LearnerConfig(objective=objective, protocol="tvtool", steps=20, lr=0.05,
                                 batch_size=40,
                                 eval_every=5, augment="none" if objective != "ufm" else "train",
                                 ufm_threshold=0.5))
    assert result.selection.startswith("held-out information")
    assert result.initial[0]["accuracy"] is None
    zero_shot = _test_accuracy(toy, encoder, torch.zeros_like(result.coefficients))
    learned = _test_accuracy(toy, encoder, result.coefficients)
    assert learned >= zero_shot, (objective, zero_shot, learned, result.best_step)
    if objective != "entropy":
        assert result.best_step > 0
        assert learned >= zero_shot + 0.2, (objective, zero_shot, learned)


def test_selection_never_prefers_a_collapsed_model(toy):
    # A model that predicts one class for everything has the lowest entropy of all; plain
    # entropy selection would take it, the label-free rule must not.
    fake = torch.zeros_like(toy.labels)
    task = TaskData("toy", toy.head, _data(toy, 200, 280, fake), _data(toy, 280, 320, fake),
                    labelled=False)
    encoder = toy.composed("task")
    # A huge learning rate drives entropy minimisation into a single-class solution.
    result = learn(encoder, [task], LearnerConfig(**PLAIN, objective="entropy", steps=20,
                                                  lr=5.0, init=0.0, batch_size=40,
                                                  eval_every=2))
    def class_entropy(coefficients: Tensor) -> float:
        with torch.no_grad():
            predicted = (F.normalize(encoder(coefficients, toy.images[280:320]), dim=-1)
                         @ toy.head.T).argmax(-1)
        share = torch.bincount(predicted, minlength=CLASSES).double() / len(predicted)
        return float(-(share[share > 0] * share[share > 0].log()).sum())

    zero_shot = class_entropy(torch.zeros_like(result.last))
    assert class_entropy(result.last) < 0.6 * zero_shot, "the last step should have collapsed"
    assert class_entropy(result.coefficients) >= 0.9 * zero_shot, result.history


def test_linearized_composition_and_learning(toy):
    encoder = toy.composed("tensor", linearized=True)
    partition = encoder.partition
    coefficients = torch.randn(1, partition.num_blocks, generator=torch.Generator()
                               .manual_seed(5))
    images = toy.images[:8]
    delta = {s.name[len("visual."):]: coefficients[0, i] * toy.tau[s.name]
             for i, s in enumerate(toy.specs)}
    expected = linearized_forward(toy.encoder, None, delta, images)
    torch.testing.assert_close(encoder(coefficients, images), expected, rtol=1e-4, atol=1e-4)
    # Labels of the linearized fine-tuned model; learning recovers its accuracy.
    with torch.no_grad():
        feats = linearized_forward(toy.encoder, None, {n[len("visual."):]: t
                                                       for n, t in toy.tau.items()},
                                   toy.images)
        lin_labels = (F.normalize(feats, dim=-1) @ toy.head.T).argmax(-1)
    task = TaskData("toy", toy.head, _data(toy, 200, 240, lin_labels),
                    _data(toy, 240, 260, lin_labels))
    result = learn(toy.composed("task", linearized=True), [task],
                   LearnerConfig(**PLAIN, steps=20, lr=0.1, batch_size=40, eval_every=5))
    assert result.best[0]["accuracy"] >= 0.9
    assert result.coefficients.item() > 0.5


def test_negation_forgets_target_and_keeps_control(toy):
    # A model that knows the toy task A (control) and a second task B (target), fine-tuned on
    # both from θ0 + τ_A; its vector τ_B, extracted from θ0 + τ_A, is what should be negated.
    gen = torch.Generator().manual_seed(9)
    patterns = torch.randn(CLASSES, 3, 32, 32, generator=gen)
    labels_b = torch.arange(200) % CLASSES
    images_b = patterns[labels_b] + torch.randn(200, 3, 32, 32, generator=gen)
    head_b = F.normalize(torch.randn(CLASSES, 64, generator=gen), dim=-1) * 20
    start = toy.moved(1.0)
    both = _finetune(toy.encoder, start, [(toy.images[:200], toy.labels[:200], toy.head),
                                          (images_b[:120], labels_b[:120], head_b)], gen)
    tau_b = {f"visual.{n}": both[n] - start[n] for n in start}
    with torch.no_grad():
        for name, parameter in toy.encoder.named_parameters():
            parameter.copy_(both[name])
    try:
        target = TaskData("B", head_b, TensorDataset(images_b[120:160], labels_b[120:160]),
                          TensorDataset(images_b[160:], labels_b[160:]), role="target")
        keep = TaskData("A", toy.head, _data(toy, 200, 240), _data(toy, 240, 280),
                        role="control")
        result = learn(toy.composed("tensor", [tau_b]), [target, keep],
                       LearnerConfig(**PLAIN, objective="negation", steps=25, lr=0.1, batch_size=64,
                                     eval_every=5))
    finally:
        with torch.no_grad():
            for name, parameter in toy.encoder.named_parameters():
                parameter.copy_(toy.theta0[name])
    initial = {r["role"]: r for r in result.initial}
    best = {r["role"]: r for r in result.best}
    assert initial["target"]["accuracy"] >= 0.7, "the toy model should know the target task"
    assert best["target"]["accuracy"] <= initial["target"]["accuracy"] - 0.25
    # The reference's rule: control kept at >= 95 % of the zero-shot model's (here the
    # initialisation, all coefficients 0).
    assert result.zero_shot == result.initial
    assert best["control"]["accuracy"] >= 0.95 * initial["control"]["accuracy"]
    assert float(result.coefficients.mean()) < 0


def test_ce_on_several_datasets_weighs_each_task(toy):
    # Two labelled datasets: the toy task, and the same images classified by a permuted head
    # (labels permuted alike), so both are solved by τ; a pure-noise vector helps neither.
    perm = torch.roll(torch.arange(CLASSES), 1)
    head_b, labels_b = toy.head[perm], torch.argsort(perm)[toy.labels]
    gen = torch.Generator().manual_seed(5)
    noise = {n: 0.5 * torch.randn(t.shape, generator=gen) * t.std() for n, t in toy.tau.items()}
    task_a = TaskData("A", toy.head, _data(toy, 200, 240), _data(toy, 240, 280))
    task_b = TaskData("B", head_b, _data(toy, 280, 320, labels_b), _data(toy, 320, 360, labels_b))
    result = learn(toy.composed("task", [toy.tau, noise]), [task_a, task_b],
                   LearnerConfig(**PLAIN, steps=30, lr=0.1, batch_size=40, eval_every=5))
    assert [r["dataset"] for r in result.best] == ["A", "B"]
    for initial, best in zip(result.initial, result.best, strict=True):
        assert best["accuracy"] >= initial["accuracy"] + 0.1, (initial, best)
    tau_coef, noise_coef = result.coefficients.reshape(-1).tolist()
    assert tau_coef > 0.3 and abs(noise_coef) < tau_coef, (tau_coef, noise_coef)


def test_early_stopping_keeps_the_best(toy):
    task = TaskData("toy", toy.head, _data(toy, 200, 216), _data(toy, 216, 224))
    # A huge learning rate wrecks the model after the first steps; selection keeps step 0.
    result = learn(toy.composed("task"), [task],
                   LearnerConfig(**PLAIN, steps=50, lr=50.0, batch_size=16, eval_every=1,
                                 patience=2))
    assert result.steps_run < 50
    scores = [h["score"] for h in result.history]
    best_index = max(range(len(scores)), key=lambda i: tuple(scores[i]))
    assert result.best_step == result.history[best_index]["step"]
    if result.best_step == 0:
        assert torch.equal(result.coefficients, torch.zeros_like(result.coefficients))


def test_split_examples():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    train, val = split_examples(labels, len(labels), shots=4, val_fraction=0.25, seed=0)
    assert len(train) + len(val) == 4 + 4 + 3
    assert sorted(torch.bincount(labels[val], minlength=3).tolist()) == [1, 1, 1]
    assert not set(train) & set(val)
    assert (train, val) == split_examples(labels, len(labels), shots=4, val_fraction=0.25,
                                          seed=0)
    assert (train, val) != split_examples(labels, len(labels), shots=4, val_fraction=0.25,
                                          seed=1)
    train, val = split_examples(None, 100, shots=2, val_fraction=0.5, seed=0, num_classes=5)
    assert len(train) == 5 and len(val) == 5
    train, val = split_examples(labels, len(labels), shots=1, val_fraction=0.5, seed=0)
    assert len(train) == 3 and val == []


def test_learner_refuses_bad_combinations(toy):
    task = TaskData("toy", toy.head, _data(toy, 0, 8))
    encoder = toy.composed("task")
    with pytest.raises(UsageError, match="target and control"):
        learn(encoder, [task], LearnerConfig(objective="negation", steps=1))
    with pytest.raises(UsageError, match="needs labels"):
        learn(encoder, [TaskData("u", toy.head, _data(toy, 0, 8), labelled=False)],
              LearnerConfig(objective="ce", steps=1))
    with pytest.raises(UsageError, match="--steps"):
        learn(encoder, [task], LearnerConfig(steps=0))


def test_without_held_out_data_the_last_step_is_kept(toy):
    import json

    notes = []
    task = TaskData("toy", toy.head, _data(toy, 200, 216))
    result = learn(toy.composed("task"), [task],
                   LearnerConfig(protocol="tvtool", steps=3, eval_every=1),
                   log=notes.append)
    assert result.selection.startswith("last step")
    assert result.best_step == result.steps_run == 3
    # precision defaults to auto, as every command's --precision; the record holds what ran.
    assert LearnerConfig().precision == "auto" and result.config["precision"] == "fp32"
    assert torch.equal(result.coefficients, result.last)
    assert any("no held-out examples" in n for n in notes)
    json.dumps(result.history, allow_nan=False)  # stored in the file's metadata
