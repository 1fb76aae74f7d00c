"""Loading sparse models back: exported folders, Hub repo ids from an offline cache, training checkpoints."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml

import st3_hf
from st3_hf import SparseLayerMixin, SparsityConfig, sparsify
from st3_hf.errors import ModelError, St3Error
from st3_hf.hub.export import export_pretrained
from st3_hf.hub.pretrained import from_pretrained, strip_prefixes
from st3_hf.train.modeling import create_model
from st3_hf.train.run_export import load_training_checkpoint, save_checkpoint_config
from st3_hf.train.recipe_schema import sparsity_config
from st3_hf.hub.state_io import load_sparsifier_state, save_sparsifier_state
from st3_hf.train.recipe import load_recipe, save_recipe
from st3_hf.train.recipe_schema import DataConfig, ModelConfig, Recipe, SparsityRecipe
from data_utils import fashion_mnist_available
from reference_formulas import train_sparse_resnet

REPO_ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.2860,), (0.3530,)
DATA_CFG = {"input_size": (1, 32, 32), "mean": MEAN, "std": STD, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "num_classes": 5}
REPO_ID = "st3-test/resnet10t-sparse"
COMMIT = "0123456789abcdef0123456789abcdef01234567"



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, sparsifier = train_sparse_resnet()
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    folder = export_pretrained(model, sparsifier, tmp_path_factory.mktemp("export") / "hub", data_pretrained_cfg=DATA_CFG)
    return dict(folder=folder, x=x, reference=reference, config=json.loads((folder / "config.json").read_text()))


def assert_one_line(info: pytest.ExceptionInfo, error_class: type, *needles: str) -> str:
    """The error is ``error_class`` (an St3Error) with a one-line message holding every needle."""
    message = str(info.value)
    assert isinstance(info.value, error_class) and isinstance(info.value, St3Error), type(info.value)
    assert "\n" not in message and message.strip() == message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def copy_export(exported, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(exported["folder"], target)
    return target


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_masks_are_the_nonzeros(sparsifier):
    assert sparsifier.frozen
    for name, layer in sparsifier.layers.items():
        assert layer.sparse_mode == "frozen", name
        assert torch.equal(layer.mask, layer.latent_weight != 0), name


# ------------------------------------------------------------------ (a) local folder
@pytest.mark.slow
def test_folder_loads_with_identical_outputs_and_frozen_masks(exported):
    model, sparsifier = st3_hf.from_pretrained(str(exported["folder"]))
    assert not model.training
    assert torch.equal(outputs(model, exported["x"]), exported["reference"])
    assert_masks_are_the_nonzeros(sparsifier)
    block = exported["config"]["sparsity"]
    assert set(sparsifier.layers) == set(block["per_layer"])
    assert sparsifier.sparsity() == pytest.approx(block["achieved_sparsity"], abs=1e-12)
    assert sparsifier.config.method == "st3" and sparsifier.config.criterion == "l1"
    assert model.pretrained_cfg["input_size"] == (1, 32, 32)
    assert list(model.pretrained_cfg["mean"]) == list(MEAN)
    assert model.pretrained_cfg["architecture"] == "resnet10t"


# ------------------------------------------------------------------ (b) Hub repo id, offline cache
@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty HF cache under a tmp HF_HOME, with offline mode on (env and the loaded constants)."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for var, value in (("HF_HOME", home), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def populate_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Write the Hub cache layout: models--ORG--NAME/refs/main + snapshots/<commit>/<files>."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        shutil.copyfile(path, snapshot / path.name)
    return snapshot


@pytest.mark.slow
def test_repo_id_loads_from_the_offline_cache(exported, offline_hub):
    from huggingface_hub import snapshot_download

    snapshot = populate_cache(offline_hub, REPO_ID, exported["folder"])
    assert Path(snapshot_download(REPO_ID, local_files_only=True)) == snapshot.resolve()
    model, sparsifier = from_pretrained(REPO_ID)
    assert torch.equal(outputs(model, exported["x"]), exported["reference"])
    assert_masks_are_the_nonzeros(sparsifier)
    model2, _ = from_pretrained(f"hf-hub:{REPO_ID}")
    assert torch.equal(outputs(model2, exported["x"]), exported["reference"])
    # and plain timm reads the same cached repo
    dense = timm.create_model(f"hf-hub:{REPO_ID}", pretrained=True)
    assert torch.equal(outputs(dense, exported["x"]), exported["reference"])


def test_repo_missing_from_the_offline_cache_is_a_clear_error(offline_hub):
    with pytest.raises(ModelError, match="st3-test/not-cached.*HF_HUB_OFFLINE") as info:
        from_pretrained("st3-test/not-cached")
    assert_one_line(info, ModelError, "'st3-test/not-cached'", "not in the local Hugging Face cache", "hf download")


def test_neither_folder_nor_repo_id(tmp_path):
    with pytest.raises(ModelError, match="neither an existing folder nor a valid Hub repo id") as info:
        from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    assert_one_line(info, ModelError, str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither an st3_hf export") as info:
        from_pretrained(tmp_path / "empty")
    assert_one_line(info, ModelError, str(tmp_path / "empty"), "Hub repo id")


def test_a_file_is_not_a_model_folder(exported):
    with pytest.raises(ModelError) as info:
        from_pretrained(exported["folder"] / "model.safetensors")
    assert_one_line(info, ModelError, "model.safetensors is a file")


def write_transformers_bert(folder: Path) -> None:
    """What a transformers BERT repo holds: a config with model_type/architectures, weights in model.safetensors."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
    }))
    safetensors.torch.save_file({"embeddings.word_embeddings.weight": torch.randn(30, 8)}, str(folder / "model.safetensors"))


def test_transformers_repo_in_the_offline_cache_is_not_an_st3_model(offline_hub, tmp_path):
    write_transformers_bert(tmp_path / "bert")
    populate_cache(offline_hub, "st3-test/bert-tiny", tmp_path / "bert")
    with pytest.raises(ValueError) as info:
        from_pretrained("st3-test/bert-tiny")
    assert_one_line(info, ModelError, "Hub repo 'st3-test/bert-tiny'", "transformers config", "'bert'", "not a timm")
    with pytest.raises(ValueError) as info:  # the same files as a local folder
        from_pretrained(tmp_path / "bert")
    assert_one_line(info, ModelError, str(tmp_path / "bert" / "config.json"), "transformers config")


def test_cached_repo_without_weights(exported, offline_hub, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported["folder"], repo)
    (repo / "model.safetensors").unlink()
    populate_cache(offline_hub, "st3-test/no-weights", repo)
    with pytest.raises(ModelError) as info:
        from_pretrained("st3-test/no-weights")
    assert_one_line(info, ModelError, "model.safetensors of Hub repo 'st3-test/no-weights'", "not found", "hf download")


# ------------------------------------------------------------------ new heads and sparse fine-tuning
def fine_tune(model, sparsifier, num_classes, steps=3):
    optimizer = sparsifier.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, num_classes, (8,), generator=g)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.slow
def test_new_dense_head_and_sparse_fine_tuning_keep_every_zero(exported):
    model, sparsifier = from_pretrained(exported["folder"], num_classes=3)
    assert type(model.fc) is nn.Linear and model.fc.out_features == 3
    assert "fc" not in sparsifier.layers and "fc" in sparsifier.config.exclude
    assert model.pretrained_cfg["num_classes"] == 3
    expected_layers = set(exported["config"]["sparsity"]["per_layer"]) - {"fc"}
    assert set(sparsifier.layers) == expected_layers
    zeros = {n: (l.latent_weight == 0).clone() for n, l in sparsifier.layers.items()}
    before = {n: l.latent_weight.detach().clone() for n, l in sparsifier.layers.items()}
    head_before = model.fc.weight.detach().clone()
    fine_tune(model, sparsifier, 3)
    changed = 0
    for name, layer in sparsifier.layers.items():
        assert bool((layer.latent_weight[zeros[name]] == 0).all()), f"{name}: a pruned weight moved"
        changed += int(not torch.equal(layer.latent_weight, before[name]))
    assert changed == len(sparsifier.layers)  # the kept weights did train
    assert not torch.equal(model.fc.weight, head_before)
    assert int((model.fc.weight == 0).sum()) == 0  # the new head is dense


@pytest.mark.slow
def test_new_pruned_head_gets_the_old_heads_sparsity(exported):
    recorded = exported["config"]["sparsity"]["per_layer"]["fc"]["sparsity"]
    model, sparsifier = from_pretrained(exported["folder"], num_classes=3, head="pruned", seed=7)
    assert isinstance(model.fc, SparseLayerMixin) and model.fc.out_features == 3
    assert sparsifier.layers["fc"] is model.fc
    numel = model.fc.weight.numel()
    head_zeros = model.fc.weight == 0
    assert int(head_zeros.sum()) == round(recorded * numel)
    assert torch.equal(model.fc.mask, ~head_zeros)
    fine_tune(model, sparsifier, 3)
    assert bool((model.fc.latent_weight[head_zeros] == 0).all())
    assert sparsifier.layer_sparsity()["fc"] == pytest.approx(round(recorded * numel) / numel)


@pytest.mark.slow
def test_fine_tuned_model_exports_and_loads_back(exported, tmp_path):
    model, sparsifier = from_pretrained(exported["folder"], num_classes=3, head="dense")
    fine_tune(model, sparsifier, 3, steps=2)
    data_cfg = dict(DATA_CFG, num_classes=3)
    folder = export_pretrained(model, sparsifier, tmp_path / "ft", data_pretrained_cfg=data_cfg, base_model=REPO_ID)
    x = exported["x"]
    reference = outputs(model, x)
    reloaded, reloaded_sp = from_pretrained(folder)
    assert torch.equal(outputs(reloaded, x), reference)
    assert "fc" not in reloaded_sp.layers and reloaded.fc.out_features == 3
    assert torch.equal(outputs(timm.create_model(f"local-dir:{folder}", pretrained=True), x), reference)
    from huggingface_hub import ModelCard

    assert ModelCard.load(folder / "README.md").data.base_model == REPO_ID


def test_bad_head_argument(exported):
    with pytest.raises(ValueError, match="head must be one of"):
        from_pretrained(exported["folder"], num_classes=3, head="sparse")


# ------------------------------------------------------------------ errors on damaged folders
def test_missing_weights_file(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "model.safetensors"), "not found", "re-run the export")


def test_export_folder_missing_its_config(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelError) as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder), "no config.json", "incomplete st3_hf export", "re-run the export")


def test_config_that_is_not_json(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    (folder / "config.json").write_text('{"architecture": "resnet10t", ')  # cut mid-write
    with pytest.raises(ValueError) as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "config.json"), "not valid JSON")


def test_truncated_weights_file(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file \(corrupt or truncated\)") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "model.safetensors"), "re-run the export")


def test_corrupt_weights_header(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # garbage inside the JSON header
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "model.safetensors"), "corrupt or truncated")


def test_weights_whose_sparsity_does_not_match_the_metadata(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    state = safetensors.torch.load_file(str(folder / "model.safetensors"))
    w = state["layer1.0.conv1.weight"]
    index = int(torch.nonzero(w.reshape(-1))[0])
    w.view(-1)[index] = 0.0  # one more zero than recorded
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="checkpoint sparsity .* of layer 'layer1.0.conv1' does not match metadata") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "model.safetensors"), "sparsity_tolerance")
    # a loose tolerance accepts it (one weight of 36864 is ~2.7e-5)
    from_pretrained(folder, sparsity_tolerance=1e-4)


def test_metadata_whose_global_sparsity_was_edited(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["sparsity"]["achieved_sparsity"] = 0.95
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match metadata 0.950000.*not an st3_hf export") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError)


def test_unknown_architecture(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "resnet_does_not_exist"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture 'resnet_does_not_exist'") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "config.json"), timm.__version__)


def test_architecture_that_does_not_fit_the_weights(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "resnet18"  # a real timm model, but not the one the weights are from
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        from_pretrained(folder)
    message = assert_one_line(info, ModelError, "does not fit resnet18", "missing keys", "shape mismatches")
    assert len(message) < 1500  # a summary, not torch's list of every key


def test_plain_timm_folder_is_not_an_st3_export(tmp_path):
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    timm.models.save_for_hf(model, str(tmp_path / "plain"), safe_serialization=True)
    with pytest.raises(ValueError, match="not an st3_hf export") as info:
        from_pretrained(tmp_path / "plain")
    assert_one_line(info, ModelError, str(tmp_path / "plain" / "config.json"), "st3_hf.sparsify")


# ------------------------------------------------------------------ (c) training checkpoints
def make_recipe() -> Recipe:
    return Recipe(
        output_dir="outputs/ckpt_test",
        description="checkpoint round trip",
        model=ModelConfig(name="resnet10t", num_classes=5, in_chans=1),
        data=DataConfig(source="fashion_mnist", input_size=[1, 32, 32], mean=list(MEAN), std=list(STD), crop_pct=1.0),
        sparsity=SparsityRecipe(method="st3_sigma", target=0.8, start_epoch=0, end_epoch=1),
    )


def write_recipe(recipe: Recipe, folder: Path) -> None:
    (folder / "recipe.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))


@pytest.fixture
def accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # leave no accelerate singleton behind for other tests
    GradientState._reset_state()


@pytest.mark.slow
def test_accelerate_checkpoint_loads_as_saved_and_exports(tmp_path, accelerate_state):
    from accelerate import Accelerator

    torch.manual_seed(0)
    recipe = make_recipe()
    model = create_model(recipe.model)
    sparsifier = sparsify(model, sparsity_config(recipe.sparsity, steps_per_epoch=3))
    optimizer = sparsifier.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 5, (8,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
    assert sparsifier.step_count == 2 and 0 < sparsifier.ratio < 0.8 and not sparsifier.frozen
    checkpoint = tmp_path / "checkpoint_2"
    accelerator.save_state(str(checkpoint))
    save_sparsifier_state(sparsifier.state_dict(), checkpoint)  # as the trainer does: no pickle
    write_recipe(recipe, checkpoint)
    save_checkpoint_config(accelerator.unwrap_model(model), recipe, checkpoint)
    assert (checkpoint / "model.safetensors").is_file() and not list(checkpoint.glob("custom_checkpoint_*"))
    reference = outputs(model, x)

    loaded, loaded_sp = from_pretrained(checkpoint)
    assert torch.equal(outputs(loaded, x), reference)
    assert loaded_sp.step_count == 2 and not loaded_sp.frozen and loaded_sp.ratio == sparsifier.ratio
    assert loaded_sp.config == sparsifier.config
    for name, layer in sparsifier.layers.items():
        assert torch.equal(loaded_sp.layers[name].mask, layer.mask), name
        assert torch.equal(loaded_sp.layers[name].threshold, layer.threshold), name
    assert loaded.pretrained_cfg["input_size"] == (1, 32, 32)

    # the export script: checkpoint -> Hub folder loadable by timm alone, same outputs
    from st3_hf.train.cli import export_main
    out = tmp_path / "hub"
    assert export_main([str(checkpoint), "--output-dir", str(out), "--metrics", '{"top1": 0.2}']) == 0
    dense = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(outputs(dense, x), reference)
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert config["sparsity"]["method"] == "st3_sigma" and config["sparsity"]["recipe"]["name"] == "ckpt_test"
    assert load_recipe(out / "recipe.yaml") == recipe


def test_checkpoint_with_wrapper_prefixes_and_new_head(tmp_path):
    torch.manual_seed(0)
    recipe = make_recipe()
    model = create_model(recipe.model)
    sparsifier = sparsify(model, sparsity_config(recipe.sparsity, steps_per_epoch=1))
    sparsifier.apply(0.7)
    sparsifier.freeze()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    # as a compiled model inside DDP would save it
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    safetensors.torch.save_file(prefixed, str(checkpoint / "model.safetensors"))
    save_sparsifier_state(sparsifier.state_dict(), checkpoint)
    write_recipe(recipe, checkpoint)
    save_checkpoint_config(model, recipe, checkpoint)
    x = torch.randn(2, 1, 32, 32)
    loaded, loaded_sp = from_pretrained(checkpoint)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert loaded_sp.frozen and loaded_sp.sparsity() == pytest.approx(sparsifier.sparsity(), abs=1e-12)

    loaded, loaded_sp = from_pretrained(checkpoint, num_classes=2)
    assert loaded.fc.out_features == 2 and "fc" not in loaded_sp.layers


def test_trainer_style_checkpoint_with_pickle_free_sparsifier_state(tmp_path):
    """The trainer saves the sparsifier as sparsifier.json + sparsifier.safetensors and the recipe with save_recipe."""
    torch.manual_seed(0)
    recipe = make_recipe()
    model = create_model(recipe.model)
    sparsifier = sparsify(model, sparsity_config(recipe.sparsity, steps_per_epoch=4))
    sparsifier.apply(0.6)
    sparsifier.step_count = 3
    checkpoint = tmp_path / "checkpoint_3"
    checkpoint.mkdir()
    safetensors.torch.save_file(model.state_dict(), str(checkpoint / "model.safetensors"))
    save_sparsifier_state(sparsifier.state_dict(), checkpoint)
    save_recipe(recipe, checkpoint / "recipe.yaml")
    save_checkpoint_config(model, recipe, checkpoint)
    x = torch.randn(2, 1, 32, 32)
    loaded, loaded_sp = from_pretrained(checkpoint)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert loaded_sp.step_count == 3 and not loaded_sp.frozen
    assert loaded_sp.sparsity() == pytest.approx(sparsifier.sparsity(), abs=1e-12)
    for name, layer in sparsifier.layers.items():
        assert torch.equal(loaded_sp.layers[name].mask, layer.mask), name
    (checkpoint / "sparsifier.safetensors").unlink()
    with pytest.raises(ModelError, match="sparsifier.safetensors"):
        from_pretrained(checkpoint)


def test_strip_prefixes():
    t = torch.zeros(1)
    out = strip_prefixes({"module._orig_mod.fc.weight": t, "_orig_mod.conv.weight": t, "bn.module.x": t})
    assert set(out) == {"fc.weight", "conv.weight", "bn.module.x"}
    with pytest.raises(ValueError, match="two checkpoint keys"):
        strip_prefixes({"module.a": t, "a": t})


def test_checkpoint_without_sparsifier_state(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_recipe(make_recipe(), folder)
    model = create_model(make_recipe().model)
    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"))
    save_checkpoint_config(model, make_recipe(), folder)
    with pytest.raises(ModelError, match="no sparsifier state") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder))
    torch.save({"something": torch.zeros(1)}, folder / "custom_checkpoint_0.pkl")  # never read: a pickle
    with pytest.raises(ModelError, match="no sparsifier state") as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder), "sparsifier.json")


def test_checkpoint_with_truncated_weights_or_no_recipe(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    recipe = make_recipe()
    model = create_model(recipe.model)
    sparsifier = sparsify(model, sparsity_config(recipe.sparsity, steps_per_epoch=1))
    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"))
    save_sparsifier_state(sparsifier.state_dict(), folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(ValueError) as info:  # the export (scripts/export.py) reads recipe.yaml: named first
        load_training_checkpoint(folder)
    assert_one_line(info, ModelError, str(folder / "recipe.yaml"), "not found")
    save_recipe(recipe, folder / "recipe.yaml")
    with pytest.raises(ValueError) as info:  # a checkpoint written before checkpoints held config.json
        load_training_checkpoint(folder)
    assert_one_line(info, ModelError, str(folder / "model.safetensors"), "corrupt or truncated")
    save_checkpoint_config(model, recipe, folder)
    for load in (from_pretrained, load_training_checkpoint):
        with pytest.raises(ValueError) as info:
            load(folder)
        assert_one_line(info, ModelError, str(folder / "model.safetensors"), "corrupt or truncated")


def test_checkpoint_without_config_json_is_refused_in_one_line_and_still_exports(tmp_path):
    """A checkpoint written before checkpoints held config.json: from_pretrained says to export it, and the export
    (its recipe.yaml) gives the same model and sparsifier as the config.json the trainer now writes."""
    torch.manual_seed(0)
    recipe = make_recipe()
    model = create_model(recipe.model)
    sparsifier = sparsify(model, sparsity_config(recipe.sparsity, steps_per_epoch=4))
    sparsifier.apply(0.6)
    folder = tmp_path / "step_00000003"
    folder.mkdir()
    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"))
    save_sparsifier_state(sparsifier.state_dict(), folder)
    save_recipe(recipe, folder / "recipe.yaml")
    with pytest.raises(ValueError) as info:
        st3_hf.from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder), "config.json", "scripts/export.py")
    old, old_sp, _ = load_training_checkpoint(folder)
    save_checkpoint_config(model, recipe, folder)
    assert st3_hf.from_pretrained is from_pretrained  # the one loader, in the hub
    new, new_sp = st3_hf.from_pretrained(folder)
    assert new.training and old.training and new_sp.state_dict().keys() == old_sp.state_dict().keys()
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    for name, layer in old_sp.layers.items():
        assert torch.equal(new_sp.layers[name].mask, layer.mask), name
    assert new.pretrained_cfg["input_size"] == (1, 32, 32)


# ------------------------------------------------------------------ a downloaded config cannot take the machine down
def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_config_asking_for_thousands_of_blocks_is_refused_from_the_header(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    edit_config(folder, lambda c: c.setdefault("model_args", {}).update(layers=[300, 300, 300, 300]))
    with pytest.raises(ValueError) as info:  # built on the meta device: no 1,200 real blocks (seconds, gigabytes)
        from_pretrained(folder)
    message = assert_one_line(info, ModelError, "does not fit resnet10t", "'layers': [300, 300, 300, 300]",
                              "missing keys", "layer1.1.")
    assert len(message) < 1500


@pytest.mark.parametrize("where", ["achieved_sparsity", "layer", "target"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.5, -0.1])
def test_non_finite_or_out_of_range_sparsity_metadata_is_refused(exported, tmp_path, where, value):
    folder = copy_export(exported, tmp_path)

    def edit(config):
        sparsity = config["sparsity"]
        if where == "layer":  # NaN compares False with everything: a dense model passed as the recorded sparse one
            for info in sparsity["per_layer"].values():
                info["sparsity"] = value
            sparsity["achieved_sparsity"] = 0.0
        elif where == "achieved_sparsity":
            sparsity["achieved_sparsity"] = value
        else:
            sparsity["config"]["target"] = value
    edit_config(folder, edit)
    if where == "layer":
        state = safetensors.torch.load_file(str(folder / "model.safetensors"))
        safetensors.torch.save_file({k: v.masked_fill(v == 0, 0.5) for k, v in state.items()},
                                    str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, "not a fraction in [0, 1]", str(folder / "model.safetensors"))


def test_config_nested_too_deep_is_one_line(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    depth = 200_000
    (folder / "config.json").write_text('{"architecture": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ValueError) as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "config.json"), "nests its JSON too deeply")


@pytest.mark.parametrize("cfg, needle", [({"input_size": 5}, "input_size 5 is not"),
                                         ({"input_size": [1, 32]}, "input_size [1, 32] is not"),
                                         ({"mean": [0.1, 0.2]}, "mean [0.1, 0.2] is not"),
                                         ({"num_classes": "five"}, "num_classes 'five'")])
def test_malformed_preprocessing_in_pretrained_cfg_is_one_line(exported, tmp_path, cfg, needle):
    folder = copy_export(exported, tmp_path)
    edit_config(folder, lambda c: c["pretrained_cfg"].update(cfg))
    with pytest.raises(ValueError) as info:
        from_pretrained(folder)
    assert_one_line(info, ModelError, str(folder / "config.json"), needle)


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Debian dataset-fashion-mnist package")
def test_trainer_checkpoint_loads_with_its_exact_masks_and_weights(tmp_path):
    """st3_hf.from_pretrained on a checkpoints/step_* folder of a real run: the saved weights, masks, thresholds and
    schedule position exactly, from the folder's config.json (no recipe read); model.init_from takes the same way."""
    from train_utils import SMALL, train_in_process

    out = tmp_path / "run"
    train_in_process("recipes/quickstart.yaml", *SMALL, "training.max_steps=4", "training.checkpoint_every_steps=4",
                     "sparsity.start_epoch=0", "sparsity.end_epoch=1", "hub.export=false", f"output_dir={out}",
                     check=True)
    checkpoint = out / "checkpoints" / "step_00000004"
    (checkpoint / "recipe.yaml").unlink()  # the model and the sparsifier come from config.json alone
    model, sparsifier = st3_hf.from_pretrained(checkpoint)
    weights, state = safetensors.torch.load_file(str(checkpoint / "model.safetensors")), load_sparsifier_state(checkpoint)
    assert model.training and not sparsifier.frozen and state["frozen"] is False
    assert (sparsifier.step_count, sparsifier.ratio, sparsifier.config.to_dict()) == (
        state["step_count"], state["ratio"], state["config"]) and 0 < sparsifier.ratio < 0.9
    assert torch.equal(sparsifier.global_threshold, state["global_threshold"])
    assert model.state_dict().keys() == weights.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert set(sparsifier.layers) == set(state["masks"])
    for name, layer in sparsifier.layers.items():
        assert torch.equal(layer.mask, state["masks"][name]) and torch.equal(layer.threshold, state["thresholds"][name])
    assert 0 < sparsifier.sparsity() < 0.9 and model.pretrained_cfg["input_size"] == (1, 28, 28)

    # fine-tuning from the checkpoint (Trainer._build_model): the same masks, frozen, in its first checkpoint
    tuned = tmp_path / "tuned"
    train_in_process("recipes/finetune_quickstart.yaml", *SMALL, "training.max_steps=1", "training.checkpoint_every_steps=1",
                     "hub.export=false", f"model.init_from={checkpoint}", f"output_dir={tuned}", check=True)
    tuned_state = load_sparsifier_state(tuned / "checkpoints" / "step_00000001")
    assert tuned_state["frozen"] is True
    for name, mask in state["masks"].items():
        assert torch.equal(tuned_state["masks"][name], mask), name
