"""LRR, iterative pruning and the fine-tuning phase against the method page (docs/method.md, "Learning-rate
rewinding (LRR) and iterative pruning", and "Facts about the reference's training"):

* rewind variant: prune over the first run; freeze; the learning rate and its schedule start
  again; the same number of epochs again with frozen masks;
* iterative variant: ``R`` rounds of ``E`` epochs; round ``r >= 1`` starts with the learning rate
  rewound and a hard global ``l1`` threshold to sparsity ``1 - (1 - 0.2)^r``; masks fixed, gradients masked;
* fine-tuning epochs after the run: frozen masks, the cosine continues past its end.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from st3_hf import SparsityConfig, sparsify
from st3_hf.errors import ConfigError
from st3_hf.train.lrr import phase_at, round_sparsity, training_phases
from st3_hf.train.optim import build_lr_scheduler
from st3_hf.train.recipe import recipe_from_dict
from st3_hf.train.recipe_schema import LRScheduleConfig
def page_cosine(step: int, warmup: int, total: int) -> float:
    """The recipes' cosine with linear warm-up, written from its definition (factor of the base lr)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def lrs(phases, steps_per_epoch: int, epochs: int, n: int) -> list:
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_lr_scheduler(opt, LRScheduleConfig(name="cosine", warmup_epochs=1), steps_per_epoch,
                               epochs * steps_per_epoch, 1.0, phases)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_rewind_variant_restarts_the_schedule_and_freezes() -> None:
    spe, epochs = 3, 4
    phases = training_phases("lrr", epochs, finetune_epochs=2)
    assert [(p.name, p.start_epoch, p.end_epoch, p.freeze, p.restart_lr) for p in phases] == [
        ("prune", 0, 4, False, False), ("retrain", 4, 8, True, True), ("finetune", 8, 10, True, False)]
    got = lrs(phases, spe, epochs, 10 * spe)
    first = [page_cosine(s, spe, epochs * spe) for s in range(epochs * spe)]
    assert got[: epochs * spe] == pytest.approx(first)
    assert got[epochs * spe: 2 * epochs * spe] == pytest.approx(first)  # rewound to the initial schedule
    # fine-tuning continues the retrain's cosine past its end (rising again, as the reference)
    tail = [0.5 * (1 + math.cos(math.pi * (s - spe) / (epochs * spe - spe))) for s in range(epochs * spe, 10 * spe - 4 * spe)]
    assert got[2 * epochs * spe:] == pytest.approx(tail)
    assert got[2 * epochs * spe] == pytest.approx(0.0, abs=1e-12) and got[-1] > 0.05  # 0 at the end, then rising


def test_iterative_rounds_rewind_points_and_sparsity() -> None:
    phases = training_phases("iterative", 2, rounds=4)
    assert [p.start_epoch for p in phases] == [0, 2, 4, 6]
    assert [p.restart_lr for p in phases] == [False, True, True, True]
    assert all(p.freeze for p in phases)
    assert phases[0].sparsity is None
    assert [p.sparsity for p in phases[1:]] == pytest.approx([1 - 0.8 ** r for r in (1, 2, 3)])
    assert phase_at(phases, 5)[0] == 2
    got = lrs(phases, 2, 2, 16)
    one_round = [page_cosine(s, 2, 4) for s in range(4)]
    assert got == pytest.approx(one_round * 4)
    assert round_sparsity(3, 0.5) == pytest.approx(0.875)


def test_prune_frozen_reaches_each_round_sparsity_and_keeps_old_zeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    sp = sparsify(model, SparsityConfig(method="gmp", target=0.5))
    sp.freeze()  # round 0: dense, masks all ones
    assert sp.sparsity() == 0.0
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    x = torch.randn(4, 3, 6, 6)
    previous_zeros = None
    for r in (1, 2, 3):
        weights = torch.cat([layer.latent_weight.detach().abs().reshape(-1) for layer in sp.layers.values()])
        t = torch.sort(weights.double()).values
        pos = (1 - 0.8 ** r) * (t.numel() - 1)
        threshold = float(t[math.floor(pos)] + (pos - math.floor(pos)) * (t[math.ceil(pos)] - t[math.floor(pos)]))
        sp.prune_frozen(round_sparsity(r, 0.2))
        for layer in sp.layers.values():
            assert torch.equal(layer.mask, layer.latent_weight.detach().abs() > 0)
            kept = layer.latent_weight.detach()[layer.mask].abs()
            assert kept.numel() == 0 or float(kept.min()) > threshold - 1e-7  # hard threshold, no shrink
        zeros = torch.cat([(layer.latent_weight.detach() == 0).reshape(-1) for layer in sp.layers.values()])
        assert float(zeros.double().mean()) == pytest.approx(1 - 0.8 ** r, abs=1.5 / zeros.numel())
        if previous_zeros is not None:
            assert torch.all(zeros[previous_zeros])  # pruned weights stay pruned
        previous_zeros = zeros
        for _ in range(2):  # train within the round: masked gradients, zeros stay zero
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        assert torch.all(torch.cat([(l.latent_weight.detach() == 0).reshape(-1) for l in sp.layers.values()])[zeros])


@pytest.mark.parametrize("section,needle", [
    ({"sparsity": {"schedule": "iterative", "method": "st3", "rounds": 3, "target": 0.36}}, "sparsity.method"),
    ({"sparsity": {"schedule": "iterative", "method": "gmp", "rounds": 3, "target": 0.9}}, "0.360000"),
    ({"sparsity": {"schedule": "lrr", "rounds": 3}}, "sparsity.rounds"),
    ({"sparsity": {"schedule": "rewind"}}, "sparsity.schedule"),
    ({"training": {"finetune_epochs": -1}}, "training.finetune_epochs"),
    ({"sparsity": {"schedule": "lrr"}, "training": {"epochs": 3}, "evaluation": {"every_epochs": 2}},
     "evaluation.every_epochs"),
])
def test_bad_schedule_keys_are_one_line_errors(section, needle) -> None:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(section)
    assert needle in str(info.value)


def test_best_weights_keep_the_highest_evaluation_and_restore_it_exactly(tmp_path) -> None:
    """The rewind's copy: highest top-1 of the phase, ties keep the earlier, a new phase starts afresh,
    and what is restored (also after a trip through a checkpoint folder) is the evaluated tensors."""
    from st3_hf.train.lrr import BestWeights, weights_digest

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    sp = sparsify(model, SparsityConfig(method="st3", target=0.5, start_step=0, end_step=2))
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x = torch.randn(4, 3, 6, 6)
    best, snapshots = BestWeights(), {}
    scores = [0.3, 0.5, 0.5, 0.4]  # step 2 is best; step 3 ties it and must not replace it
    for step, score in enumerate(scores, start=1):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        snapshots[step] = ({k: v.clone() for k, v in model.state_dict().items()},
                           {n: layer.mask.clone() for n, layer in sp.layers.items()}, sp.ratio)
        kept = best.offer(score, model, sp, {"step": step, "epoch": 0, "phase_index": 0})
        assert kept == (step in (1, 2))
    assert best.for_phase(0)["step"] == 2 and best.for_phase(1) is None

    best.save(tmp_path)
    reloaded = BestWeights()
    reloaded.load(tmp_path, best.meta)
    for source in (best, reloaded):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()  # move away from step 2
        digest = source.restore(model, sp)
        weights, masks, ratio = snapshots[2]
        got = model.state_dict()
        assert got.keys() == weights.keys()
        for key in weights:
            assert torch.equal(got[key], weights[key]), key
        for name, layer in sp.layers.items():
            assert torch.equal(layer.mask, masks[name]), name
        assert sp.ratio == ratio and digest == weights_digest(weights)
    # a later phase's first evaluation replaces the copy whatever its score
    assert best.offer(0.1, model, sp, {"step": 9, "epoch": 2, "phase_index": 1})
