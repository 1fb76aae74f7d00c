"""Nothing in a model folder, Hub repo or checkpoint is ever executed.

(a) A static scan of the project's code (``st3_hf/`` and ``scripts/``): no
    unpickling (``pickle.load``...), ``torch.load`` only with
    ``weights_only=True``, no ``trust_remote_code=True``, no ``eval``/``exec``,
    no unsafe YAML loading.  The scanner is itself tested on bad snippets.
(b) Malicious pickles (a ``__reduce__`` that creates a marker file) under every
    name a loader might try, and repos asking for remote code: ``from_pretrained``
    refuses with a clear :class:`~st3_hf.errors.St3Error`, or loads the safe
    files only, and the marker never appears.
"""
from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Set

import pytest
import safetensors.torch
import timm
import torch

from st3_hf import SparsityConfig, sparsify
from st3_hf.errors import ModelError, St3Error
from st3_hf.hub.export import export_pretrained
from st3_hf.hub.pretrained import from_pretrained
from st3_hf.train.recipe import save_recipe
from st3_hf.train.run_export import save_checkpoint_config
from st3_hf.train.recipe_schema import DataConfig, ModelConfig, Recipe, SparsityRecipe
from st3_hf.hub.state_io import save_sparsifier_state
from test_from_pretrained import offline_hub, populate_cache  # noqa: F401  (offline_hub is a fixture)

REPO = Path(__file__).resolve().parents[1]
SCANNED = sorted([*REPO.joinpath("st3_hf").rglob("*.py"), *REPO.joinpath("scripts").rglob("*.py")])
DATA_CFG = {"input_size": (1, 32, 32), "mean": (0.286,), "std": (0.353,), "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "num_classes": 5}
# every name under which some loader (timm, transformers, accelerate, torch hub) looks for pickled weights
PICKLE_NAMES = ["pytorch_model.bin", "model.bin", "pytorch_model.pt", "model.pt", "model.pth", "pytorch_model.pth",
                "model.ckpt", "checkpoint.pth.tar", "open_clip_pytorch_model.bin", "pytorch_model-00001-of-00002.bin"]
UNPICKLING_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("_pickle", "load"),
                    ("_pickle", "loads"), ("cPickle", "load"), ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"),
                    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("marshal", "load"),
                    ("marshal", "loads"), ("shelve", "open"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                    ("jit", "load")}


# ------------------------------------------------------------------ (a) static scan
def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name/Attribute chain ('' for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def safe_loader_classes(tree: ast.AST) -> Set[str]:
    """Names of the module's classes deriving (through its own classes too) from a yaml ``Safe*Loader``."""
    bases = {node.name: [_dotted(b) for b in node.bases] for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    safe: Set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name not in safe and any(p.split(".")[-1].startswith("Safe") or p in safe for p in parents):
                safe.add(name)
                changed = True
    return safe


def unsafe_calls(source: str, filename: str = "<string>") -> List[str]:
    """``file:line: what`` for every construct that could run code from a file's content."""
    findings = []
    tree = ast.parse(source, filename)
    safe_loaders = safe_loader_classes(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "_pickle", "dill", "cloudpickle", "marshal"}:
            loaders = [a.name for a in node.names if a.name in {"load", "loads", "Unpickler"}]
            if loaders:
                findings.append(f"{where}: from {node.module} import {loaders}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.split("."))
        if name in {"eval", "exec", "builtins.eval", "builtins.exec"}:
            findings.append(f"{where}: {name}()")
        if len(parts) >= 2 and parts[-2:] in UNPICKLING_CALLS:
            findings.append(f"{where}: {name}()")
        if name == "torch.load" and not _keyword_is(node, "weights_only", True):
            findings.append(f"{where}: torch.load without weights_only=True")
        loader = next((_dotted(k.value) for k in node.keywords if k.arg == "Loader"), "")
        if name == "yaml.load" and not (loader.split(".")[-1].startswith("Safe") or loader in safe_loaders):
            findings.append(f"{where}: yaml.load without a SafeLoader")
        if _keyword_is(node, "trust_remote_code", True):
            findings.append(f"{where}: trust_remote_code=True")
        if _keyword_is(node, "allow_pickle", True):
            findings.append(f"{where}: allow_pickle=True")
    return findings


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.load(open('x', 'rb'))",
        "import pickle\npickle.loads(data)",
        "from pickle import load",
        "import torch\ntorch.load('m.bin')",
        "import torch\ntorch.load('m.bin', weights_only=False)",
        "eval(open('cfg').read())",
        "exec(code)",
        "AutoModel.from_pretrained(repo, trust_remote_code=True)",
        "import yaml\nyaml.load(text)",
        "import yaml\nclass L(yaml.Loader): pass\nyaml.load(text, Loader=L)",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import torch\ntorch.jit.load('m.pt')",
    ],
)
def test_the_scanner_finds_unsafe_loading(snippet):
    assert unsafe_calls(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('m.pkl', map_location='cpu', weights_only=True)",
        "model.eval()",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nclass L(yaml.SafeLoader): pass\nclass M(L): pass\nyaml.load(text, Loader=M)",
        "import pickle\nexcept_class = pickle.UnpicklingError",
    ],
)
def test_the_scanner_accepts_safe_code(snippet):
    assert unsafe_calls(snippet) == []


def test_project_code_never_runs_code_from_files():
    assert len(SCANNED) > 20  # the scan did find the project's files
    findings = [f for path in SCANNED for f in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert findings == []


# ------------------------------------------------------------------ (b) malicious files
class Payload:
    """Unpickling this creates ``marker``: the proof that a loader executed the file's content."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> None:
    """A pickle that would create ``marker`` when loaded: torch's zip format for .bin/.pt/..., raw for .pkl."""
    if path.suffix == ".pkl":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state_dict": Payload(marker)}, path)


@pytest.mark.slow
def test_the_payload_is_live(tmp_path):
    """The malicious files are real: an unsafe load does create the marker (so its absence below means something)."""
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "model.bin", marker)
    write_payload(tmp_path / "state.pkl", marker)
    code = "import torch, sys; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.bin")], check=True, cwd=Path(__file__).parent)
    assert marker.exists()
    marker.unlink()
    pickle.loads((tmp_path / "state.pkl").read_bytes())
    assert marker.exists()


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.8, end_step=1))
    sparsifier.apply(0.8)
    return export_pretrained(model, sparsifier, tmp_path_factory.mktemp("security") / "export", data_pretrained_cfg=DATA_CFG)


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory) -> Path:
    """A trainer-style checkpoint: model.safetensors, sparsifier.json/.safetensors, recipe.yaml, config.json."""
    torch.manual_seed(0)
    recipe = Recipe(
        output_dir="outputs/security",
        model=ModelConfig(name="resnet10t", num_classes=5, in_chans=1),
        data=DataConfig(source="fashion_mnist", input_size=[1, 32, 32], mean=[0.286], std=[0.353], crop_pct=1.0),
        sparsity=SparsityRecipe(method="st3", target=0.8, start_epoch=0, end_epoch=1),
    )
    model = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.8, end_step=1))
    sparsifier.apply(0.8)
    folder = tmp_path_factory.mktemp("security") / "step_00000010"
    folder.mkdir()
    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"))
    save_sparsifier_state(sparsifier.state_dict(), folder)
    save_recipe(recipe, folder / "recipe.yaml")
    save_checkpoint_config(model, recipe, folder)
    return folder


def one_line_error(info: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(info.value)
    assert isinstance(info.value, St3Error)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.mark.slow
@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_export_with_pickled_weights_only_is_refused_unopened(export_folder, tmp_path, name):
    folder = tmp_path / "export"
    shutil.copytree(export_folder, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    write_payload(folder / name, marker)
    with pytest.raises(ModelError) as info:
        from_pretrained(folder)
    one_line_error(info, "model.safetensors not found", name, "never loads")
    assert not marker.exists()


def test_hub_repo_with_pickled_weights_only_is_refused_unopened(export_folder, tmp_path, offline_hub):  # noqa: F811
    repo = tmp_path / "repo"
    shutil.copytree(export_folder, repo)
    (repo / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    for name in PICKLE_NAMES:
        write_payload(repo / name, marker)
    populate_cache(offline_hub, "st3-test/pickled", repo)
    with pytest.raises(ModelError) as info:
        from_pretrained("st3-test/pickled")
    one_line_error(info, "st3-test/pickled", "model.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_model.bin", "scaler.pt"])
def test_checkpoint_pickles_next_to_safe_files_are_never_opened(checkpoint_folder, tmp_path, name):
    folder = tmp_path / "step_00000010"
    shutil.copytree(checkpoint_folder, folder)
    marker = tmp_path / "pwned"
    write_payload(folder / name, marker)
    model, sparsifier = from_pretrained(folder)  # loads model.safetensors + sparsifier.* + config.json only
    assert sparsifier.sparsity() > 0.7
    assert not marker.exists()


def test_checkpoint_whose_weights_are_only_pickles_is_refused_unopened(checkpoint_folder, tmp_path):
    folder = tmp_path / "step_00000010"
    shutil.copytree(checkpoint_folder, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    for name in ("optimizer.bin", "pytorch_model.bin", "random_states_0.pkl"):
        write_payload(folder / name, marker)
    with pytest.raises(ModelError) as info:
        from_pretrained(folder)
    one_line_error(info, "model.safetensors not found", "optimizer.bin", "pytorch_model.bin")
    assert not marker.exists()


def test_malicious_sparsifier_pickle_is_never_opened(checkpoint_folder, tmp_path):
    folder = tmp_path / "step_00000010"
    shutil.copytree(checkpoint_folder, folder)
    for name in ("sparsifier.json", "sparsifier.safetensors"):
        (folder / name).unlink()
    marker = tmp_path / "pwned"
    write_payload(folder / "custom_checkpoint_0.pt", marker)  # torch.save format under accelerate's name below
    (folder / "custom_checkpoint_0.pt").rename(folder / "custom_checkpoint_0.pkl")
    with pytest.raises(ModelError) as info:  # the sparsifier state is read from safetensors + JSON only
        from_pretrained(folder)
    one_line_error(info, "no sparsifier state", str(folder))
    assert not marker.exists()


@pytest.mark.slow
def test_export_script_ignores_checkpoint_pickles(checkpoint_folder, tmp_path):
    from st3_hf.train.cli import export_main
    folder = tmp_path / "step_00000010"
    shutil.copytree(checkpoint_folder, folder)
    marker = tmp_path / "pwned"
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        write_payload(folder / name, marker)
    assert export_main([str(folder), "--output-dir", str(tmp_path / "hub")]) == 0
    assert not marker.exists()


# ------------------------------------------------------------------ remote code
def write_code_module(folder: Path, marker: Path, module: str = "modeling_evil") -> None:
    """A Python file in the repo that would create ``marker`` if anything imported it."""
    (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass EvilNet: pass\n")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes",
    [
        {"auto_map": {"AutoModel": "modeling_evil.EvilNet"}},
        {"auto_map": {"AutoModel": "modeling_evil.EvilNet"}, "architecture": "modeling_evil.EvilNet"},
        {"custom_pipelines": {"image-classification": {"impl": "modeling_evil.Pipe"}}},
    ],
    ids=["auto_map", "auto_map+custom-architecture", "custom_pipelines"],
)
def test_config_asking_for_remote_code_is_refused(export_folder, tmp_path, changes):
    folder = tmp_path / "export"
    shutil.copytree(export_folder, folder)
    marker = tmp_path / "pwned"
    write_code_module(folder, marker)
    edit_config(folder, **changes)
    with pytest.raises(ModelError) as info:
        from_pretrained(folder)
    one_line_error(info, "config.json", "asks for remote code", "never runs code")
    assert not marker.exists()


def test_hub_repo_asking_for_remote_code_is_refused(export_folder, tmp_path, offline_hub):  # noqa: F811
    repo = tmp_path / "repo"
    shutil.copytree(export_folder, repo)
    marker = tmp_path / "pwned"
    write_code_module(repo, marker)
    edit_config(repo, auto_map={"AutoModel": "modeling_evil.EvilNet"})
    populate_cache(offline_hub, "st3-test/remote-code", repo)
    with pytest.raises(ModelError) as info:
        from_pretrained("st3-test/remote-code")
    one_line_error(info, "st3-test/remote-code", "asks for remote code")
    assert not marker.exists()


def test_custom_architecture_is_not_imported(export_folder, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(export_folder, folder)
    marker = tmp_path / "pwned"
    write_code_module(folder, marker)
    edit_config(folder, architecture="modeling_evil.EvilNet")
    with pytest.raises(ModelError) as info:
        from_pretrained(folder)
    one_line_error(info, "unknown architecture 'modeling_evil.EvilNet'", "timm")
    assert not marker.exists()


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained"])
def test_model_args_that_make_timm_read_files_are_refused(export_folder, tmp_path, key):
    folder = tmp_path / "export"
    shutil.copytree(export_folder, folder)
    marker = tmp_path / "pwned"
    write_payload(folder / "pytorch_model.bin", marker)
    config = json.loads((folder / "config.json").read_text())
    value = {"checkpoint_path": str(folder / "pytorch_model.bin"),
             "pretrained_cfg_overlay": {"file": str(folder / "pytorch_model.bin")}, "pretrained": True}[key]
    config["model_args"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as info:
        from_pretrained(folder)
    one_line_error(info, key, "timm.create_model")
    assert not marker.exists()
