"""A method added from outside the core -- one registered class, as docs/method.md "Adding a method" shows --
runs through ``sparsify``, ``apply``, the optimizer hook, the state round trip and ``freeze`` with no change
to the Sparsifier or the layers; and those hold no method-specific code."""
from __future__ import annotations

import ast
import copy
import io
from pathlib import Path
from typing import Iterator, Type

import pytest
import torch
import torch.nn as nn

from st3_hf import SparsityConfig, sparsify
from st3_hf.sparse.methods import METHODS, SparsityMethod, register

CORE = Path(__file__).resolve().parents[1] / "st3_hf" / "sparse"


@pytest.fixture
def random_mask() -> Iterator[Type[SparsityMethod]]:
    @register("random_mask")
    class RandomMask(SparsityMethod):
        """Every weight has a fixed random score; the global quantile of the scores prunes; gradient masked."""

        layer_buffers = ("score",)

        def attach(self, layer):
            generator = torch.Generator().manual_seed(layer.latent_weight.numel())
            layer.register_buffer("score", torch.rand(layer.latent_weight.shape, generator=generator), persistent=False)

        def effective(self, layer, latent, threshold):
            mask = layer.score > threshold
            return torch.where(mask, latent, torch.zeros((), dtype=latent.dtype)), mask

        def forward_weight(self, layer, latent):
            return latent * layer.mask

        @torch.no_grad()
        def prune(self, sp, ratio):
            if ratio <= 0:
                return super().prune(sp, ratio)  # the dense model
            t = torch.quantile(torch.cat([layer.score.reshape(-1) for layer in sp.layers.values()]), ratio)
            for layer in sp.layers.values():
                layer.set_threshold(t)
            return t

        def state_dict(self, sp):
            return {"scores": {name: layer.score.clone() for name, layer in sp.layers.items()}}

        def load_state_dict(self, sp, state):
            for name, layer in sp.layers.items():
                layer.score.copy_(state["scores"][name])

    try:
        yield RandomMask
    finally:
        del METHODS["random_mask"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))


def test_a_registered_method_runs_through_sparsify_apply_state_and_freeze(random_mask) -> None:
    model = _model()
    plain = copy.deepcopy(model)
    sp = sparsify(model, method="random_mask", target=0.5, start_step=0, end_step=3)
    assert isinstance(sp.method, random_mask) and sp._fused is None  # its own rule: the per-layer path
    assert (sp.config.criterion, sp.config.soft_threshold, sp.config.rescale, sp.config.straight_through) == (
        "l1", False, False, True)
    assert {"0.score", "3.score"} <= set(model._ddp_params_and_buffers_to_ignore)

    sp.apply(0.5)
    scores = torch.cat([layer.score.reshape(-1) for layer in sp.layers.values()])
    t = torch.quantile(scores, 0.5)
    assert float(sp.global_threshold) == float(t) and sp.ratio == 0.5
    for name, layer in sp.layers.items():
        mask = layer.score > t
        assert torch.equal(layer.mask, mask)
        torch.testing.assert_close(layer.weight, plain[int(name)].weight * mask, rtol=0, atol=0)
    assert sp.sparsity() == pytest.approx(0.5, abs=1e-3)

    # the optimizer hook advances the schedule; the gradient of pruned weights is masked by forward_weight
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(2, 3, 5, 5)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        for layer in sp.layers.values():
            assert torch.all(layer.latent_weight.grad[~layer.mask] == 0)
        opt.step()
    assert sp.step_count == 2 and sp.ratio == pytest.approx(0.5 * (1 - (1 / 3) ** 3))

    # state round trip, through weights_only serialisation, into a fresh model whose scores differ
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sparsifier": sp.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["sparsifier"]["scores"]) == set(sp.layers)
    other = _model()
    sp2 = sparsify(other, method="random_mask", target=0.5, start_step=0, end_step=3)
    with torch.no_grad():
        for layer in sp2.layers.values():
            layer.score.uniform_()
    other.load_state_dict(saved["model"])
    sp2.load_state_dict(saved["sparsifier"])
    assert (sp2.step_count, sp2.ratio, sp2.frozen) == (sp.step_count, sp.ratio, sp.frozen)
    for name, layer in sp2.layers.items():
        assert torch.equal(layer.score, sp.layers[name].score)
        assert torch.equal(layer.mask, sp.layers[name].mask)
    for a, b in zip(sp.effective_weights().values(), sp2.effective_weights().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)

    # freeze: w <- q, the masks stay, zeros stay zero through further updates
    sp2.freeze()
    opt2 = sp2.wrap(torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9))
    for _ in range(2):
        opt2.zero_grad()
        other(x).square().sum().backward()
        opt2.step()
    for name, layer in sp2.layers.items():
        assert torch.all(layer.latent_weight[~sp.layers[name].mask] == 0)


def test_registry_names_the_method_and_refuses_duplicates_and_other_methods_keys(random_mask) -> None:
    assert METHODS["random_mask"] is random_mask and random_mask.name == "random_mask"
    with pytest.raises(ValueError, match="already registered"):
        register("random_mask")(random_mask)
    with pytest.raises(ValueError, match="'p' is a feather setting; method 'random_mask' does not use it"):
        SparsityConfig(method="random_mask", p=3.0)
    with pytest.raises(ValueError, match="valid methods: st3, st3_sigma, .*random_mask"):
        SparsityConfig(method="random")


def test_the_methods_own_their_defaults_and_checks() -> None:
    switches = ("criterion", "soft_threshold", "rescale", "straight_through")
    expected = {"st3": ("l1", True, True, True), "st3_sigma": ("l1std", True, True, True),
                "gmp": ("l1", False, False, False), "ste_hard": ("l1", False, False, True),
                "dense": ("l1", False, False, True), "feather": ("l1", True, False, True),
                "probmask": ("l1", False, False, False)}
    assert set(METHODS) == set(expected)
    for name, defaults in expected.items():
        extra = dict(steps_per_epoch=1, temperature_epochs=1) if name == "probmask" else {}
        config = SparsityConfig(method=name, target=0.0 if name == "dense" else 0.9, **extra)
        assert tuple(getattr(config, key) for key in switches) == defaults, name
    fused = {name: sparsify(_model(), method=name, target=0.0 if name == "dense" else 0.9,
                            **(dict(steps_per_epoch=1, temperature_epochs=1) if name == "probmask" else {}))._fused
             is not None for name in expected}
    assert fused == {name: name not in ("feather", "probmask") for name in expected}


def _code_words(path: Path) -> str:
    """Every name, attribute and string of a module's code (comments and docstrings left out), lower case."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
    return " ".join(words).lower()


def test_the_sparsifier_and_the_layers_hold_no_method_specific_code() -> None:
    for module in ("sparsifier.py", "layers.py", "fused_update.py"):
        code = _code_words(CORE / module)
        # every method name ("st3" is also the package's prefix, "dense" also a layer mode) and ProbMask's state
        names = [m for m in METHODS if m not in ("st3", "dense")] + ["probas", "sampled_mask", "weight_rule", "temperature"]
        for word in names:
            assert word not in code, f"{module} names {word!r}"
