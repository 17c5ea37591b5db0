"""The learning protocols of ``learn-coeffs`` against re-derivations of their references.

Every expected value is recomputed here from the reference code's rules, with plain torch on a
toy encoder (a two-layer MLP): the reference's per-tensor, per-vector composition loop
(``w = θ0 + Σ_t λ[t, j] τ_t[j]``), its loss, and its optimiser step written out by hand
(Adam / AdamW moments, the cosine schedule of ``src/utils.py``, ``clip_grad_norm_`` applied to
the fp16 GradScaler's scaled gradient). Batches are built so that their composition cannot
change the loss (every example of a set in the batch, or identical examples), and the draws'
composition is checked on its own against the references' samplers.
"""

from __future__ import annotations

import math

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
)
from tvtool.atlas.draws import EpochDraw, FreshDraw, TwoStreamDraw
from tvtool.atlas.examples import Examples
from tvtool.atlas.objectives import TaskScore, collapse_reasons, selection_score, ufm_loss
from tvtool.atlas.protocols import AMP_LOSS_SCALE, DEFAULT_PROTOCOL, oversampled
from tvtool.atlas.selection import Candidates
from tvtool.atlas.ufm import reference_trusted
from tvtool.errors import UsageError

BETAS, EPS = (0.9, 0.999), 1e-8
CPU = torch.device("cpu")


class Toy:
    """A 12 -> 8 -> 6 MLP as the "image encoder", two task vectors, two 3-class heads."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6))
        with torch.no_grad():
            for p in self.encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.theta0 = {n: p.detach().clone() for n, p in self.encoder.named_parameters()}
        self.specs = [TensorSpec(f"visual.{n}", tuple(p.shape)) for n, p in self.theta0.items()]
        self.taus = [{f"visual.{n}": 0.5 * torch.randn(p.shape, generator=gen)
                      for n, p in self.theta0.items()} for _ in range(2)]
        self.heads = [F.normalize(torch.randn(3, 6, generator=gen), dim=-1) * 10
                      for _ in range(2)]
        self.gen = gen

    def composed(self, granularity: str = "tensor") -> ComposedEncoder:
        partition = build_partition(self.specs, granularity, seed=0)
        return ComposedEncoder(self.encoder, VectorStack(Packing(partition), self.taus))

    def images(self, n: int) -> Tensor:
        return torch.randn(n, 3, 2, 2, generator=self.gen)

    def logits(self, coefficients: Tensor, images: Tensor, head: Tensor) -> Tensor:
        """The reference's composition loop, one coefficient per vector per tensor."""
        params = {}
        for j, (name, theta) in enumerate(self.theta0.items()):
            weight = theta.clone()
            for t, tau in enumerate(self.taus):
                weight = weight + coefficients[t, j] * tau[f"visual.{name}"]
            params[name] = weight
        feats = functional_call(self.encoder, params, (images,))
        return (feats / feats.norm(dim=-1, keepdim=True)) @ head.T


@pytest.fixture(scope="module")
def toy() -> Toy:
    return Toy()


def _entropy(logits: Tensor) -> Tensor:
    """AdaMerging's ``softmax_entropy``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def _adam(param: Tensor, grad: Tensor, state: dict[str, Tensor], step: int, lr: float,
          weight_decay: float = 0.0) -> Tensor:
    """One AdamW step written out (torch.optim.Adam when weight_decay is 0)."""
    param = param * (1 - lr * weight_decay)
    state["m"] = BETAS[0] * state.get("m", torch.zeros_like(grad)) + (1 - BETAS[0]) * grad
    state["v"] = BETAS[1] * state.get("v", torch.zeros_like(grad)) + (1 - BETAS[1]) * grad ** 2
    m_hat = state["m"] / (1 - BETAS[0] ** step)
    v_hat = state["v"] / (1 - BETAS[1] ** step)
    return param - lr * m_hat / (v_hat.sqrt() + EPS)


def _scaled_clip(grad: Tensor, max_norm: float = 1.0, scale: float = AMP_LOSS_SCALE) -> Tensor:
    """``clip_grad_norm_`` on the GradScaler's scaled gradient, then ``scaler.step``'s unscale."""
    scaled = grad * scale
    norm = scaled.norm()
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return scaled * factor / scale


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------


def test_each_objective_defaults_to_its_reference_protocol():
    assert DEFAULT_PROTOCOL == {"ce": "atlas", "ufm": "atlas", "negation": "atlas",
                                "entropy": "adamerging", "infomax": "tvtool"}
    ada = LearnerConfig(objective="entropy").resolved()
    assert (ada.protocol, ada.steps, ada.lr, ada.init, ada.batch_size, ada.schedule,
            ada.weight_decay, ada.grad_clip, ada.augment) == \
        ("adamerging", 500, 1e-3, 0.3, 16, "constant", 0.0, 0.0, "none")
    few = LearnerConfig(objective="ce").resolved()
    assert (few.protocol, few.steps, few.epochs, few.lr, few.weight_decay, few.batch_size,
            few.schedule, few.grad_clip) == ("atlas", None, 10, 0.1, 0.1, 128, "cosine", 1.0)
    ufm = LearnerConfig(objective="ufm").resolved()
    assert (ufm.protocol, ufm.epochs, ufm.lr, ufm.ufm_reading) == ("atlas", 10, 1e-3, "code")
    neg = LearnerConfig(objective="negation").resolved()
    assert (neg.protocol, neg.batch_size, neg.schedule, neg.negation_loss) == \
        ("atlas", 128, "constant", "ce")
    old = LearnerConfig(objective="ufm", protocol="tvtool").resolved()
    assert (old.batch_size, old.eval_every, old.ufm_reading, old.schedule, old.negation_loss) \
        == (32, 10, "paper", "cosine", "unlikelihood")
    with pytest.raises(UsageError, match="does not run the ce objective"):
        LearnerConfig(objective="ce", protocol="adamerging").check()
    with pytest.raises(UsageError, match="--epochs is the atlas"):
        LearnerConfig(objective="entropy", epochs=3).check()
    with pytest.raises(UsageError, match="unknown protocol"):
        LearnerConfig(protocol="shot").check()


def test_oversampling_is_the_few_shot_reference_rule():
    for count, batch in [(10, 128), (160, 128), (1280, 128), (1279, 128), (6, 21), (1, 1)]:
        r = count / batch  # learn_few_shots.py
        expected = int(10 / r) + 1 if r < 10 else 1
        assert oversampled(count, batch) == expected


# ---------------------------------------------------------------------------------------------
# AdaMerging
# ---------------------------------------------------------------------------------------------


def test_fresh_draw_is_two_batches_of_16_from_a_new_shuffle():
    data = TensorDataset(torch.arange(40.0)[:, None, None, None].expand(40, 3, 2, 2).clone(),
                         torch.arange(40))
    draw = FreshDraw(Examples(data, "d", CPU, 0), 16, 2, seed=0)
    draw.begin(None)
    seen = []
    for _ in range(20):
        batches = draw.next()
        assert [len(labels) for _, labels in batches] == [16, 16]
        step = torch.cat([labels for _, labels in batches])
        assert len(set(step.tolist())) == 32  # one permutation: no repeat within a step
        assert torch.equal(batches[0][0][:, 0, 0, 0].long(), batches[0][1])
        seen.append(frozenset(step.tolist()))
    assert len(set(seen)) > 1  # every step reshuffles
    short = FreshDraw(Examples(TensorDataset(torch.zeros(20, 3, 2, 2), torch.arange(20)), "s",
                               CPU, 0), 16, 2, seed=0)
    assert [len(b[1]) for b in short.next()] == [16, 4]  # the loader's short last batch
    tiny = FreshDraw(Examples(TensorDataset(torch.zeros(9, 3, 2, 2), torch.arange(9)), "t",
                              CPU, 0), 16, 2, seed=0)
    assert [len(b[1]) for b in tiny.next()] == [9]  # one batch: the loader has only one


def test_adamerging_steps_are_the_reference_update_with_the_clamp(toy):
    # Each dataset has exactly 32 images, so a step's two batches of 16 hold all of them in
    # some order, and the sum of the two batch means does not depend on the order.
    images = [toy.images(32), toy.images(32)]
    tasks = [TaskData(f"d{i}", toy.heads[i], TensorDataset(images[i], torch.zeros(32).long()),
                      labelled=False) for i in range(2)]
    init, lr, steps = 1.0 - 5e-4, 1e-3, 3  # a step of ±lr leaves [0, 1] on one side
    result = learn(toy.composed(), tasks,
                   LearnerConfig(objective="entropy", protocol="adamerging", steps=steps,
                                 init=init, lr=lr, precision="fp32"))
    raw = torch.full((2, len(toy.specs)), init)
    state: dict[str, Tensor] = {}
    for step in range(1, steps + 1):
        lam = raw.clone().requires_grad_(True)
        # main_layer_wise_adamerging.py: lambdas() = clamp(lambdas_raw, 0, 1); per dataset
        # two batches, losses += softmax_entropy(outputs).mean(0) for each.
        clamped = torch.clamp(lam, min=0.0, max=1.0)
        total = torch.zeros(())
        for head, imgs in zip(toy.heads, images, strict=True):
            for half in imgs.split(16):
                total = total + _entropy(toy.logits(clamped, half, head)).mean(0)
        (grad,) = torch.autograd.grad(total, lam)
        raw = _adam(raw, grad, state, step, lr)
    assert (raw > 1).any() and (raw < 1).any()  # the clamp was exercised
    expected = raw.clamp(0.0, 1.0)
    torch.testing.assert_close(result.coefficients, expected, rtol=0, atol=1e-6)
    assert result.best_step == steps and result.selection.startswith("last iterate")
    assert result.at_edge is None


# ---------------------------------------------------------------------------------------------
# aTLAS
# ---------------------------------------------------------------------------------------------


def test_epoch_draw_is_the_oversampled_subset_random_sampler():
    data = TensorDataset(torch.zeros(5, 3, 2, 2), torch.arange(5))
    indices = torch.arange(5).repeat(oversampled(5, 4))  # 5 / 4 -> 9 copies
    draw = EpochDraw(Examples(data, "d", CPU, 0), indices, 4, seed=1)
    assert draw.batches_per_epoch == math.ceil(45 / 4) == 12
    draw.begin(draw.batches_per_epoch)
    epochs = []
    for _ in range(2):
        batches = [draw.next()[0][1] for _ in range(draw.batches_per_epoch)]
        assert [len(b) for b in batches] == [4] * 11 + [1]  # the last batch short
        labels = torch.cat(batches)
        assert sorted(labels.tolist()) == sorted(indices.tolist())  # each copy once an epoch
        epochs.append(labels.tolist())
    assert epochs[0] != epochs[1]  # a new permutation every epoch
    # In a run whose epoch is shorter (another dataset's), the permutation restarts early.
    short = EpochDraw(Examples(data, "d", CPU, 0), indices, 4, seed=1)
    short.begin(3)
    firsts = [short.next()[0][1] for _ in range(6)]
    assert torch.equal(torch.cat(firsts[:3]), torch.tensor(epochs[0][:12]))


@pytest.mark.parametrize("workers", [0, 2])
def test_draws_read_the_same_examples_from_disk_as_from_memory(monkeypatch, workers):
    import tvtool.atlas.examples as examples_module

    data = TensorDataset(torch.arange(50.0)[:, None, None, None].expand(50, 3, 2, 2).clone(),
                         torch.arange(50))

    def steps(examples: Examples) -> list[list[int]]:
        draws = [FreshDraw(examples, 8, 2, seed=3),
                 EpochDraw(examples, torch.arange(50).repeat(2), 16, seed=4),
                 TwoStreamDraw(examples, torch.arange(10, 50), torch.arange(10), 8, seed=5)]
        for draw in draws:
            draw.begin(3)
        out = []
        for _ in range(7):
            for draw in draws:
                for images, labels in draw.next():
                    assert torch.equal(images[:, 0, 0, 0].long(), labels)
                    out.append(labels.tolist())
        for draw in draws:
            draw.close()
        return out

    in_memory = steps(Examples(data, "d", CPU, 0))
    monkeypatch.setattr(examples_module, "MATERIALIZE_BYTES", 0)
    on_disk = Examples(data, "d", CPU, workers)
    assert on_disk.images is None  # read through a DataLoader
    assert steps(on_disk) == in_memory


def _constant_task(toy: Toy, label: int, role: str = "train", n: int = 8,
                   index: int = 0) -> TaskData:
    """``n`` copies of one image: any batch of them has the same mean loss."""
    image = toy.images(1).expand(n, 3, 2, 2).clone()
    data = TensorDataset(image, torch.full((n,), label))
    return TaskData(f"{role}{index}", toy.heads[index], data, val=data, role=role)


def test_atlas_few_shot_steps_are_the_reference_update(toy):
    task = _constant_task(toy, 1)
    result = learn(toy.composed(), [task],
                   LearnerConfig(objective="ce", protocol="atlas", epochs=1, batch_size=8,
                                 augment="none", precision="fp32"))
    # 8 shots, batch 8: r = 1 < 10 -> 11 copies, 88 indices, 11 batches in the epoch.
    steps = 11
    assert result.steps_run == steps and result.config["steps"] == steps
    image, label = task.train[0]
    coef = torch.zeros(2, len(toy.specs))
    state: dict[str, Tensor] = {}
    for step in range(steps):
        lam = coef.clone().requires_grad_(True)
        loss = F.cross_entropy(toy.logits(lam, image[None], task.head), label[None])
        (grad,) = torch.autograd.grad(loss, lam)
        lr = 0.5 * (1 + math.cos(math.pi * step / steps)) * 0.1  # cosine_lr, no warm-up
        coef = _adam(coef, _scaled_clip(grad), state, step + 1, lr, weight_decay=0.1)
    torch.testing.assert_close(result.last, coef, rtol=0, atol=2e-6)
    # An ordinary clip at 1 moves the coefficients differently: the test can tell.
    unclipped = torch.zeros(2, len(toy.specs))
    state = {}
    lam = unclipped.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(toy.logits(lam, image[None], task.head),
                                                  label[None]), lam)
    first = _adam(unclipped, grad, state, 1, 0.1, weight_decay=0.1)
    first_scaled = _adam(torch.zeros_like(grad), _scaled_clip(grad), {}, 1, 0.1, 0.1)
    assert (first - first_scaled).abs().max() > 1e-5
    # Selection: the val split's accuracy after the epoch, against the zero-shot model's.
    assert [r["step"] for r in result.history] == [0, steps]
    assert result.selection.startswith("accuracy on the labelled val split")


def test_atlas_negation_is_constant_lr_and_minus_ce_plus_ce(toy):
    target = _constant_task(toy, 0, "target", n=4, index=0)
    control = _constant_task(toy, 2, "control", n=4, index=1)
    config = LearnerConfig(objective="negation", protocol="atlas", epochs=2, batch_size=8,
                           augment="none", precision="fp32")
    assert config.resolved().batch_size // 2 == 4  # 8 split over target and control
    result = learn(toy.composed(), [target, control], config)
    steps = 2  # 4 target examples in batches of 4: one batch an epoch
    assert result.steps_run in (1, steps)  # stops early once the control falls
    images = [target.train[0][0][None], control.train[0][0][None]]
    coef = torch.zeros(2, len(toy.specs))
    state: dict[str, Tensor] = {}
    for step in range(result.steps_run):
        lam = coef.clone().requires_grad_(True)
        loss = -F.cross_entropy(toy.logits(lam, images[0], target.head), torch.tensor([0])) \
            + F.cross_entropy(toy.logits(lam, images[1], control.head), torch.tensor([2]))
        (grad,) = torch.autograd.grad(loss, lam)
        coef = _adam(coef, _scaled_clip(grad), state, step + 1, 5e-3, weight_decay=0.1)
    torch.testing.assert_close(result.last, coef, rtol=0, atol=1e-6)


def test_two_stream_draw_is_the_ufm_batch_sampler():
    data = TensorDataset(torch.zeros(60, 3, 2, 2), torch.arange(60))
    primary, secondary = torch.arange(10, 60), torch.tensor([0, 1, 1, 2, 3])
    draw = TwoStreamDraw(Examples(data, "d", CPU, 0), primary, secondary, 16, seed=0)
    assert draw.batches_per_epoch == 50 // 12 == 4  # len(primary) // (3 * 16 // 4)
    draw.begin(draw.batches_per_epoch)
    firsts = []
    for _ in range(4):
        labels = draw.next()[0][1]
        assert len(labels) == 16
        assert all(i >= 10 for i in labels[:12].tolist())  # 3/4 primary
        assert all(i < 10 for i in labels[12:].tolist())   # 1/4 secondary (trusted)
        firsts += labels[:12].tolist()
    assert len(set(firsts)) == 48  # primary indices once an epoch, the remainder dropped


def _reference_trusted_mask(preds: Tensor) -> tuple[Tensor, Tensor]:
    """learn_ufm.py's trusted list and ``trusted_bool``, line by line."""
    k = min(int((len(preds) / preds.shape[1]) / 10), 100)
    trusted = torch.tensor([], dtype=torch.long)
    ids_c = torch.tensor([], dtype=torch.long)
    for c in range(preds.shape[1]):
        ids_c = torch.argsort(preds[:, c])
        trusted = torch.cat((trusted, ids_c[-k:]))
    trusted, _ = torch.sort(trusted)
    trusted_bool = torch.zeros(len(preds), dtype=torch.bool)
    trusted_bool[ids_c] = 1
    return trusted, trusted_bool


def test_ufm_code_reading_trusts_every_example_as_the_reference():
    preds = torch.rand(95, 3, generator=torch.Generator().manual_seed(2)).softmax(-1)
    trusted, trusted_bool = _reference_trusted_mask(preds)
    assert bool(trusted_bool.all())  # the reference's mask: every example
    assert torch.equal(reference_trusted(preds), trusted)  # repeats kept
    with pytest.raises(UsageError, match="10 examples per class"):
        reference_trusted(preds[:20])
    # ssl_loss_trusted with every example trusted: CE of the strong view against one-hot
    # zero-shot pseudo-labels, each weighted 1 (max 1 > 0.99).
    strong = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    pseudo = torch.tensor([0, 2, 1, 1, 0, 2])
    expected = sum(-strong[i].log_softmax(-1)[pseudo[i]] for i in range(6)) / 6
    all_true = torch.ones(6, dtype=torch.bool)
    assert float(ufm_loss(None, strong, pseudo, all_true)) == pytest.approx(float(expected))
    plain = torch.randn(6, 3)
    assert float(ufm_loss(plain, strong, pseudo, all_true)) == pytest.approx(float(expected))


@pytest.mark.parametrize("sampler", ["atlas", "tvtool"])
def test_ufm_readings_set_the_loss_mask(toy, sampler):
    from tvtool.atlas.ufm import ufm_task

    data = TensorDataset(toy.images(60), torch.zeros(60).long())
    composed = toy.composed()
    zero = composed.weights(torch.zeros(2, len(toy.specs)))

    def logits_of(images: Tensor, head: Tensor, weights: dict[str, Tensor]) -> Tensor:
        feats = composed.features(images, weights)
        return F.normalize(feats, dim=-1) @ head.T

    masks = {}
    for reading in ("code", "paper"):
        task = ufm_task("d", data, toy.heads[0], zero, logits_of, 16,
                        torch.Generator().manual_seed(0), CPU, 0, 64, lambda _: None,
                        sampler=sampler, reading=reading)
        masks[reading] = task.trusted
        with torch.no_grad():
            expected = logits_of(data.tensors[0], toy.heads[0], zero).argmax(-1)
        assert torch.equal(task.pseudo, expected)
    assert bool(masks["code"].all())
    assert 3 <= int(masks["paper"].sum()) <= 6  # k = 2 per class, de-duplicated


def test_atlas_ufm_step_is_ce_against_zero_shot_pseudo_labels(toy):
    # 40 copies of one image, 3 classes: k = int(40 / 3 / 10) = 1, one trusted example per
    # class, 37 others; batch 16: 12 others + 4 trusted, 37 // 12 = 3 batches an epoch.
    image = toy.images(1)
    data = TensorDataset(image.expand(40, 3, 2, 2).clone(), torch.zeros(40).long())
    val = TensorDataset(image.expand(4, 3, 2, 2).clone(), torch.zeros(4).long())
    task = TaskData("u", toy.heads[0], data, val=val, labelled=False)
    result = learn(toy.composed(), [task],
                   LearnerConfig(objective="ufm", protocol="atlas", epochs=1, batch_size=16,
                                 augment="none", precision="fp32"))
    assert result.steps_run == 3
    with torch.no_grad():
        pseudo = toy.logits(torch.zeros(2, len(toy.specs)), image, task.head).argmax(-1)
    coef = torch.zeros(2, len(toy.specs))
    state: dict[str, Tensor] = {}
    for step in range(3):
        lam = coef.clone().requires_grad_(True)
        loss = F.cross_entropy(toy.logits(lam, image, task.head), pseudo)
        (grad,) = torch.autograd.grad(loss, lam)
        lr = 0.5 * (1 + math.cos(math.pi * step / 3)) * 1e-3
        coef = _adam(coef, _scaled_clip(grad), state, step + 1, lr, weight_decay=0.1)
    torch.testing.assert_close(result.last, coef, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# aTLAS x K
# ---------------------------------------------------------------------------------------------


def test_atlas_k_partition_is_the_reference_rule():
    specs = [TensorSpec("visual.class_embedding", (16,)),
             TensorSpec("visual.conv1.weight", (16, 3, 2, 2)),
             TensorSpec("visual.a.weight", (40, 30)),
             TensorSpec("visual.a.bias", (40,)),
             TensorSpec("visual.b.weight", (40, 30)),
             TensorSpec("visual.c.weight", (30, 40)),
             TensorSpec("visual.positional_embedding", (5, 16))]
    k = 3
    partition = build_partition(specs, f"atlas:{k}", seed=4)
    two_d = [s for s in specs if len(s.shape) == 2]
    assert [s.name for s in partition.tensors] == [s.name for s in two_d]  # others keep θ0
    assert partition.num_blocks == k * len(two_d)
    groups = {s.name: partition.element_blocks(s.name) - k * partition.index[s.name]
              for s in two_d}
    assert torch.equal(groups["visual.a.weight"], groups["visual.b.weight"])  # shared by shape
    assert not torch.equal(groups["visual.a.weight"].reshape(-1)[:1200],
                           groups["visual.c.weight"].reshape(-1)[:1200])
    sizes = torch.bincount(groups["visual.a.weight"].reshape(-1), minlength=k)
    assert len(set(sizes.tolist())) > 1  # randint: unequal groups
    assert all(abs(int(n) - 400) < 4 * math.sqrt(400) for n in sizes)  # uniform draw
    # The composed offsets equal the reference's mask_multiply (one-hot masks, einsums).
    gen = torch.Generator().manual_seed(5)
    vectors = [{s.name: torch.randn(s.shape, generator=gen) for s in specs} for _ in range(2)]
    coefficients = torch.randn(2, partition.num_blocks, generator=gen)
    packing = Packing(partition)
    offsets = packing.unpack(VectorStack(packing, vectors).combine(coefficients))
    for spec in two_d:
        i = partition.index[spec.name]
        coefs = coefficients[:, i * k:(i + 1) * k]                          # [T, K]
        mask = F.one_hot(groups[spec.name], k).moveaxis(-1, 0).float()      # [K, *shape]
        params = torch.stack([v[spec.name] for v in vectors])               # [T, *shape]
        coef_mask = torch.einsum("ij,jbk->ibk", coefs, mask)
        expected = torch.einsum("ibk,ibk->bk", coef_mask, params)
        torch.testing.assert_close(offsets[spec.name], expected, rtol=1e-5, atol=1e-5)
    # The mask depends on the seed and the shape only: another tensor order, the same mask.
    shuffled = build_partition(list(reversed(specs)), f"atlas:{k}", seed=4)
    name = "visual.a.weight"
    assert torch.equal(shuffled.element_blocks(name) - k * shuffled.index[name], groups[name])
    assert not torch.equal(build_partition(specs, f"atlas:{k}", seed=5).element_blocks(name)
                           - k * partition.index[name], groups[name])


# ---------------------------------------------------------------------------------------------
# Collapse guard and selection edges
# ---------------------------------------------------------------------------------------------


def _score(counts: list[int], entropy: float, marginal: float) -> TaskScore:
    """Held-out statistics from a predicted-class histogram (uniform prior over 10 digits)."""
    n = sum(counts)
    hist = [c / n for c in counts]
    class_entropy = -sum(p * math.log(p) for p in hist if p > 0)
    return TaskScore("train", n, None, None, entropy, marginal, class_entropy,
                     math.log(len(counts)), max(hist))


def test_collapse_guard_holds_when_zero_shot_is_collapsed():
    # The digits case: zero-shot predicts two classes for 500 of 540 images; entropy
    # minimisation then predicts one class for 384 of them -- a histogram *more* spread than
    # zero-shot's, so the old rule (0.9 x zero-shot's entropy) let it through.
    zero_shot = _score([250, 250] + [5] * 8, entropy=1.0, marginal=1.1)
    collapsed = _score([384] + [17] * 8 + [20], entropy=0.02, marginal=1.25)
    healthy = _score([52, 56, 50, 58, 54, 55, 53, 57, 51, 54], entropy=1.2, marginal=2.25)
    assert collapsed.class_entropy > zero_shot.class_entropy  # why the old rule failed
    assert collapsed.information > healthy.information        # and information alone fails
    reasons = collapse_reasons([collapsed], [zero_shot], ["digits"])
    assert reasons and "class prior" in reasons[0] and "71%" in reasons[0]
    assert collapse_reasons([healthy], [zero_shot], ["digits"]) == []
    scored = {name: selection_score("entropy", [s], [zero_shot])
              for name, s in (("collapsed", collapsed), ("healthy", healthy))}
    assert scored["collapsed"][0] == 0.0 and scored["healthy"] > scored["collapsed"]
    # In a run: zero-shot (the guard's reference), the initialisation, the collapsed step.
    tracker = Candidates("entropy", "held-out", ["digits"], control_threshold=0.95)
    tracker.zero_shot = [zero_shot]
    tracker.offer(-1, torch.zeros(1, 1), None, [zero_shot], candidate=True)
    tracker.offer(0, torch.full((1, 1), 0.3), None, [healthy])
    tracker.offer(10, torch.ones(1, 1), 0.1, [collapsed])
    assert tracker.best.step == 0
    records = tracker.records()
    assert records[2]["admissible"] is False and "class prior" in records[2]["rejected"][0]
    assert records[2]["datasets"][0]["class_entropy_ratio"] == pytest.approx(
        collapsed.class_entropy / math.log(10))
    assert records[0]["admissible"] is False  # zero-shot itself is collapsed


def test_selection_reports_an_edge():
    def offer(tracker: Candidates, step: int, accuracy: float) -> None:
        tracker.offer(step, torch.zeros(1, 1), None,
                      [TaskScore("train", 10, accuracy, 0.5, 0.5)])

    first = Candidates("ce", "held-out", ["d"], control_threshold=0.95)
    for step, accuracy in [(0, 0.8), (10, 0.7), (20, 0.75)]:
        offer(first, step, accuracy)
    assert first.at_edge() == "first"
    last = Candidates("ce", "val-split", ["d"], control_threshold=0.95, ties=False)
    for step, accuracy in [(0, 0.5), (10, 0.7), (20, 0.75)]:
        offer(last, step, accuracy)
    assert last.at_edge() == "last" and last.best.step == 20
    middle = Candidates("ce", "held-out", ["d"], control_threshold=0.95)
    for step, accuracy in [(0, 0.5), (10, 0.9), (20, 0.75)]:
        offer(middle, step, accuracy)
    assert middle.at_edge() is None
    # aTLAS keeps the earlier epoch on an accuracy tie (acc > best_acc), loss or not.
    tie = Candidates("ce", "val-split", ["d"], control_threshold=0.95, ties=False)
    tie.offer(0, torch.zeros(1, 1), None, [TaskScore("train", 10, 0.6, 0.9, 0.5)])
    tie.offer(10, torch.zeros(1, 1), None, [TaskScore("train", 10, 0.6, 0.1, 0.5)])
    assert tie.best.step == 0


def test_path_and_audit_are_recorded(toy):
    images = toy.images(32)
    labels = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(7))
    task = TaskData("d0", toy.heads[0], TensorDataset(images, labels), labelled=False,
                    audit=TensorDataset(images, labels))
    result = learn(toy.composed(), [task],
                   LearnerConfig(objective="entropy", steps=4, eval_every=2, precision="fp32"))
    assert [r["step"] for r in result.history] == [-1, 0, 2, 4]
    assert len(result.path) == len(result.history)
    assert torch.equal(result.path[-1], result.coefficients)
    with torch.no_grad():
        expected = float((toy.logits(result.coefficients, images, task.head).argmax(-1)
                          == labels).float().mean())
    assert result.history[-1]["audit_accuracy"]["d0"] == pytest.approx(expected)
    stats = result.history[-1]["datasets"][0]
    assert stats["accuracy"] is None  # labels never read for the path's label-free scores
    assert {"information", "class_entropy", "class_entropy_ratio", "top_share"} <= set(stats)
    # Auditing the very examples the path is scored on takes one pass: the same figures.
    train = TensorDataset(images, labels)
    shared = learn(toy.composed(), [TaskData("d0", toy.heads[0], train, labelled=False,
                                             audit=train)],
                   LearnerConfig(objective="entropy", steps=4, eval_every=2, precision="fp32"))
    assert [r["audit_accuracy"] for r in shared.history] == \
        [r["audit_accuracy"] for r in result.history]
    assert [r["datasets"] for r in shared.history] == [r["datasets"] for r in result.history]
