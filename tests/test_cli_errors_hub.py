"""The Hub-side scripts on bad inputs: one ``error: ...`` line naming the problem, exit code 2, never a traceback.

Each case calls the script's entry point (``scripts/evaluate_model.py``, ``scripts/export.py``,
``scripts/push_to_hub.py``: ``st3_hf.train.cli``) in this process, offline, with the Hugging Face home
in a temporary folder (its cache holds the repos a case needs) and no token; each test checks one case.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

import pytest
import safetensors.torch
import timm
import torch

from st3_hf import SparsityConfig, sparsify
from st3_hf.train.cli import evaluate_main, export_main, push_main
from st3_hf.train.run_export import export_run
from st3_hf.train.recipe import save_recipe
from st3_hf.train.recipe_schema import DataConfig, ModelConfig, Recipe, SparsityRecipe
from st3_hf.hub.state_io import save_sparsifier_state
from test_from_pretrained import populate_cache
from train_utils import error_line, in_process

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
MEAN, STD = (0.2860,), (0.3530,)
DATA_CFG = {"input_size": (1, 32, 32), "mean": MEAN, "std": STD, "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "num_classes": 5}
BERT_REPO = "st3-test/bert-tiny"
MISSING_REPO = "st3-test/not-in-cache"
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_TOKEN_PATH")


class Case(NamedTuple):
    script: str
    args: Callable[[Dict[str, Path]], List[str]]
    needles: Tuple[str, ...]  # substrings the error line must contain
    token: bool = False  # run with a (dummy) HF_TOKEN


# ------------------------------------------------------------------ inputs
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # garbage inside the JSON header
    path.write_bytes(bytes(data))


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A damage: ``edit`` applied to the folder's config.json."""
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return damage


def nest_config(folder: Path, depth: int = 200_000) -> None:
    (folder / "config.json").write_text('{"architecture": ' + "[" * depth + "]" * depth + "}")


def variant(base: Path, root: Path, name: str, damage: Callable[[Path], None]) -> Path:
    """A copy of ``base`` in ``root/name`` damaged by ``damage(folder)``."""
    folder = root / name
    shutil.copytree(base, folder)
    damage(folder)
    return folder


def make_recipe() -> Recipe:
    return Recipe(
        output_dir="outputs/cli_errors",
        model=ModelConfig(name="resnet10t", num_classes=5, in_chans=1),
        data=DataConfig(source="fashion_mnist", root="/usr/share/datasets/fashion-mnist", input_size=[1, 32, 32],
                        mean=list(MEAN), std=list(STD), crop_pct=1.0),
        sparsity=SparsityRecipe(method="st3", target=0.8, start_epoch=0, end_epoch=1),
    )


def write_bert_repo(folder: Path) -> None:
    """A transformers-style BERT repo: config.json with model_type/architectures, weights in model.safetensors."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 30,
    }))
    safetensors.torch.save_file(
        {"embeddings.word_embeddings.weight": torch.randn(30, 8), "pooler.dense.weight": torch.randn(8, 8)},
        str(folder / "model.safetensors"),
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Dict[str, Path]:
    """Every folder the cases use: a good export and checkpoint, their damaged copies, an HF cache."""
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    recipe = make_recipe()
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.8, end_step=1))
    sparsifier.apply(0.8)

    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    safetensors.torch.save_file(model.state_dict(), str(checkpoint / "model.safetensors"))
    save_sparsifier_state(sparsifier.state_dict(), checkpoint)
    save_recipe(recipe, checkpoint / "recipe.yaml")
    export = export_run(model, sparsifier, root / "export", recipe, data_pretrained_cfg=DATA_CFG)

    hf_home = root / "hf_home"
    (hf_home / "hub").mkdir(parents=True)
    write_bert_repo(root / "bert")
    populate_cache(hf_home / "hub", BERT_REPO, root / "bert")
    return {
        "root": root,
        "hf_home": hf_home,
        "recipe": checkpoint / "recipe.yaml",
        "export": export,
        "checkpoint": checkpoint,
        "export_truncated": variant(export, root, "export_truncated", lambda f: truncate(f / "model.safetensors")),
        "export_corrupt": variant(export, root, "export_corrupt", lambda f: corrupt_header(f / "model.safetensors")),
        "export_no_config": variant(export, root, "export_no_config", lambda f: (f / "config.json").unlink()),
        "export_huge_model_args": variant(export, root, "export_huge_model_args", edit_config(
            lambda c: c.setdefault("model_args", {}).update(layers=[300, 300, 300, 300]))),
        "export_nan_sparsity": variant(export, root, "export_nan_sparsity", edit_config(
            lambda c: c["sparsity"].update(achieved_sparsity=float("nan")))),
        "export_deep_config": variant(export, root, "export_deep_config", nest_config),
        "export_bad_input_size": variant(export, root, "export_bad_input_size", edit_config(
            lambda c: c["pretrained_cfg"].update(input_size=5))),
        "checkpoint_truncated": variant(checkpoint, root, "ckpt_truncated", lambda f: truncate(f / "model.safetensors")),
        "checkpoint_corrupt": variant(checkpoint, root, "ckpt_corrupt", lambda f: corrupt_header(f / "model.safetensors")),
        "checkpoint_no_recipe": variant(checkpoint, root, "ckpt_no_recipe", lambda f: (f / "recipe.yaml").unlink()),
    }


# ------------------------------------------------------------------ cases
def evaluate(model: Callable[[Dict[str, Path]], str]) -> Callable[[Dict[str, Path]], List[str]]:
    return lambda p: [model(p), "--recipe", str(p["recipe"])]


def export_cmd(checkpoint: str, *extra: str) -> Callable[[Dict[str, Path]], List[str]]:
    return lambda p: [str(p[checkpoint]), "--output-dir", str(p["root"] / f"out_{checkpoint}"), *extra]


def push(folder: Callable[[Dict[str, Path]], str], repo_id: str = "st3-test/model") -> Callable[[Dict[str, Path]], List[str]]:
    return lambda p: [folder(p), "--repo-id", repo_id]


CASES: Dict[str, Case] = {
    # evaluate_model.py: exported folders, Hub repos
    "evaluate-truncated-safetensors": Case(
        "evaluate_model.py", evaluate(lambda p: str(p["export_truncated"])), ("model.safetensors", "corrupt or truncated")),
    "evaluate-corrupt-header": Case(
        "evaluate_model.py", evaluate(lambda p: str(p["export_corrupt"])), ("model.safetensors", "corrupt or truncated")),
    "evaluate-missing-config": Case(
        "evaluate_model.py", evaluate(lambda p: str(p["export_no_config"])), ("no config.json", "incomplete st3_hf export")),
    "evaluate-not-a-model-repo": Case(
        "evaluate_model.py", evaluate(lambda p: BERT_REPO), (BERT_REPO, "transformers config", "not a timm")),
    "evaluate-repo-not-in-cache": Case(
        "evaluate_model.py", evaluate(lambda p: MISSING_REPO), (MISSING_REPO, "not in the local Hugging Face cache")),
    "evaluate-config-for-another-model": Case(  # built on the meta device, checked against the header
        "evaluate_model.py", evaluate(lambda p: str(p["export_huge_model_args"])), ("does not fit resnet10t", "missing keys")),
    "evaluate-nan-sparsity-metadata": Case(
        "evaluate_model.py", evaluate(lambda p: str(p["export_nan_sparsity"])), ("achieved_sparsity is nan", "not a fraction")),
    "evaluate-config-nested-too-deep": Case(
        "evaluate_model.py", evaluate(lambda p: str(p["export_deep_config"])), ("config.json", "nests its JSON too deeply")),
    "evaluate-input-size-not-a-list": Case(
        "evaluate_model.py", evaluate(lambda p: str(p["export_bad_input_size"])), ("pretrained_cfg input_size 5 is not",)),
    "evaluate-bad-repo-id": Case(
        "evaluate_model.py", evaluate(lambda p: "no such/model..x"), ("no such/model..x", "nor a valid Hub repo id")),
    # export.py: training checkpoints
    "export-truncated-safetensors": Case(
        "export.py", export_cmd("checkpoint_truncated"), ("model.safetensors", "corrupt or truncated")),
    "export-corrupt-header": Case(
        "export.py", export_cmd("checkpoint_corrupt"), ("model.safetensors", "corrupt or truncated")),
    "export-missing-recipe": Case(
        "export.py", export_cmd("checkpoint_no_recipe"), ("recipe.yaml not found",)),
    "export-of-an-export": Case(
        "export.py", export_cmd("export"), ("is an exported model folder", "not a training checkpoint")),
    "export-missing-checkpoint": Case(
        "export.py", lambda p: [str(p["root"] / "nope"), "--output-dir", str(p["root"] / "out_nope")], ("does not exist",)),
    "export-bad-metrics-json": Case(
        "export.py", export_cmd("checkpoint", "--metrics", "{top1: 0.7"), ("--metrics is not valid JSON",)),
    "export-metrics-in-percent": Case(
        "export.py", export_cmd("checkpoint", "--metrics", '{"top1": 76.1}'), ("top1=76.1 is not a fraction",)),
    # push_to_hub.py: checked before any network call
    "push-without-token": Case(
        "push_to_hub.py", push(lambda p: str(p["export"])), ("st3-test/model", "no Hugging Face token", "hf auth login")),
    "push-bad-repo-id": Case(
        "push_to_hub.py", push(lambda p: str(p["export"]), "not-a-repo-id"), ("repo id", "ORG/NAME")),
    "push-invalid-repo-name": Case(
        "push_to_hub.py", push(lambda p: str(p["export"]), "org/bad..name"), ("invalid Hub repo id", "org/bad..name")),
    "push-missing-config": Case(
        "push_to_hub.py", push(lambda p: str(p["export_no_config"])), ("not a complete st3_hf export", "config.json"), token=True),
    "push-truncated-safetensors": Case(
        "push_to_hub.py", push(lambda p: str(p["export_truncated"])), ("model.safetensors", "corrupt or truncated"), token=True),
    "push-not-a-folder": Case(
        "push_to_hub.py", push(lambda p: str(p["root"] / "nope")), ("is not a folder",), token=True),
}


ENTRY_POINTS = {"evaluate_model.py": evaluate_main, "export.py": export_main, "push_to_hub.py": push_main}


@pytest.fixture(scope="module")
def results(inputs) -> Dict[str, subprocess.CompletedProcess]:
    """Every case's exit code and output, the Hugging Face home pointed at the cases' cache folder."""
    from huggingface_hub import constants

    hf_home, done = inputs["hf_home"], {}
    for name, case in CASES.items():
        with pytest.MonkeyPatch.context() as mp:
            for var in TOKEN_VARS:
                mp.delenv(var, raising=False)
            if case.token:
                mp.setenv("HF_TOKEN", "hf_dummy_not_a_real_token")
            # huggingface_hub reads these from the environment once, at import
            for constant, value in {"HF_HOME": hf_home, "HF_HUB_CACHE": hf_home / "hub", "HF_TOKEN_PATH": hf_home / "token",
                                    "HF_STORED_TOKENS_PATH": hf_home / "stored_tokens"}.items():
                mp.setattr(constants, constant, str(value))
            mp.setattr(constants, "HF_HUB_OFFLINE", True)
            done[name] = in_process(ENTRY_POINTS[case.script], str(SCRIPTS / case.script), case.args(inputs),
                                    cwd=inputs["root"])
    return done


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error_line(results, name):
    line = error_line(results[name], exit_code=2)
    assert line.startswith("error: "), line
    for needle in CASES[name].needles:
        assert needle in line, f"{needle!r} not in {line!r}"


def test_no_output_folder_is_left_by_a_failed_export(results, inputs):
    for name, case in CASES.items():
        if case.script == "export.py":
            out = Path(case.args(inputs)[2])
            assert not out.exists(), name
            assert not list(out.parent.glob(f".{out.name}.st3-tmp-*")), name


def test_push_without_token_made_no_network_call(results):
    # offline mode would turn any Hub call into an OfflineModeIsEnabled error: the token check came first
    assert "Offline" not in results["push-without-token"].stderr
