"""Pushing an export: exact file list, the Hub API calls (network methods mocked), and early clear errors."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import yaml
import timm
import torch
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from st3_hf import SparsityConfig, sparsify
from st3_hf.errors import ModelError, RunError, St3Error
from st3_hf.train.run_export import export_run
from st3_hf.hub.push import push_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = ["config.json", "model.safetensors", "model.sparse.safetensors", "README.md", "sparsity_per_layer.png", "recipe.yaml"]
DATA_CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic",
            "crop_pct": 0.9, "crop_mode": "center", "num_classes": 5}


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    from st3_hf.train.recipe_schema import Recipe
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5, in_chans=3)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.9, end_step=1))
    sparsifier.apply(0.9)
    folder = export_run(model, sparsifier, tmp_path_factory.mktemp("push") / "hub", Recipe(), data_pretrained_cfg=DATA_CFG)
    # stray files an upload must not pick up
    (folder / "notes.txt").write_text("local scratch")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "tmp.lock").write_text("")
    return folder


def assert_one_line(info: pytest.ExceptionInfo, error_class: type, *needles: str) -> None:
    message = str(info.value)
    assert isinstance(info.value, error_class) and isinstance(info.value, St3Error), type(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace HfApi's network methods by recorders; everything else in huggingface_hub runs for real."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs, self.token))

    def upload_folder(self, **kwargs):
        # what would be uploaded, read now: the pushed copy is a temporary folder
        staged = Path(kwargs["folder_path"])
        kwargs["uploaded"] = {p.name: p.read_bytes() for p in staged.iterdir() if p.name in kwargs["allow_patterns"]}
        calls.append(("upload_folder", kwargs["repo_id"], kwargs, self.token))
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_exactly_the_export_files(export_folder, hub_calls):
    before = folder_digest(export_folder)
    url = push_folder(export_folder, "st3-test/test-resnet-st3", private=True, token="hf_dummy")
    assert url == "https://huggingface.co/st3-test/test-resnet-st3"
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    _, repo_id, kwargs, token = hub_calls[0]
    assert repo_id == "st3-test/test-resnet-st3" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert token == "hf_dummy"
    _, repo_id, kwargs, token = hub_calls[1]
    assert repo_id == "st3-test/test-resnet-st3" and token == "hf_dummy"
    assert Path(kwargs["folder_path"]) != export_folder  # a copy, local paths replaced (the folder is unchanged)
    assert sorted(kwargs["allow_patterns"]) == sorted(EXPECTED_FILES) == sorted(kwargs["uploaded"])
    for name in ("model.safetensors", "model.sparse.safetensors", "sparsity_per_layer.png", "config.json"):
        assert kwargs["uploaded"][name] == (export_folder / name).read_bytes(), name
    # what upload_folder would select from the folder with those patterns: exactly the export
    on_disk = [str(p.relative_to(export_folder)) for p in export_folder.rglob("*") if p.is_file()]
    selected = list(filter_repo_objects(on_disk, allow_patterns=kwargs["allow_patterns"]))
    assert sorted(selected) == sorted(EXPECTED_FILES)
    assert kwargs["revision"] is None
    assert folder_digest(export_folder) == before


def test_push_to_a_branch_creates_it(export_folder, hub_calls):
    push_folder(export_folder, "st3-test/test-resnet-st3", revision="v1", token="hf_dummy")
    assert [c[0] for c in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub_calls[1][2]["branch"] == "v1"
    assert hub_calls[2][2]["revision"] == "v1"


def test_token_from_environment(export_folder, hub_calls, no_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    push_folder(export_folder, "st3-test/test-resnet-st3")
    assert hub_calls[-1][3] == "hf_from_env"


def test_missing_token_fails_before_any_call(export_folder, hub_calls, no_token):
    with pytest.raises(ModelError, match="hf auth login") as info:
        push_folder(export_folder, "st3-test/test-resnet-st3")
    assert_one_line(info, ModelError, "'st3-test/test-resnet-st3'", "no Hugging Face token", "HF_TOKEN")
    assert hub_calls == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad name/model", "org/model..x", "org/" + "x" * 100])
def test_wrong_repo_id_fails_first(export_folder, hub_calls, no_token, repo_id):
    # checked before the token: a bad id is reported even when no token is configured
    with pytest.raises(ValueError, match="repo id") as info:
        push_folder(export_folder, repo_id)
    assert_one_line(info, ModelError, repr(repo_id))
    assert hub_calls == []


def test_incomplete_folder_is_refused(export_folder, hub_calls, tmp_path):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(export_folder, folder)
    (folder / "README.md").unlink()
    with pytest.raises(ModelError, match=r"not a complete st3_hf export.*README\.md") as info:
        push_folder(folder, "st3-test/x", token="hf_dummy")
    assert_one_line(info, ModelError, str(folder), "re-run the export")
    assert hub_calls == []


def test_folder_without_config_is_refused(export_folder, hub_calls, tmp_path):
    import shutil

    folder = tmp_path / "no_config"
    shutil.copytree(export_folder, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelError) as info:
        push_folder(folder, "st3-test/x", token="hf_dummy")
    assert_one_line(info, ModelError, "missing or empty ['config.json']")
    assert hub_calls == []


def test_missing_folder_is_refused(hub_calls, tmp_path):
    with pytest.raises(ModelError) as info:
        push_folder(tmp_path / "nope", "st3-test/x", token="hf_dummy")
    assert_one_line(info, ModelError, str(tmp_path / "nope"), "is not a folder")
    assert hub_calls == []


def test_corrupt_weights_are_refused(export_folder, hub_calls, tmp_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(export_folder, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file") as info:
        push_folder(folder, "st3-test/x", token="hf_dummy")
    assert_one_line(info, ModelError, str(folder / "model.safetensors"), "corrupt or truncated")
    assert hub_calls == []


def test_upload_failure_leaves_the_folder_intact(export_folder, monkeypatch):
    before = folder_digest(export_folder)

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        raise ConnectionError("network is down")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    with pytest.raises(RunError, match="network is down.*local folder is unchanged") as info:
        push_folder(export_folder, "st3-test/x", token="hf_dummy")
    assert_one_line(info, RunError, "'st3-test/x'")
    assert info.value.exit_code == 1
    assert folder_digest(export_folder) == before


def test_rejected_token_is_an_auth_error(export_folder, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    class Response:  # what HfHubHTTPError reads of an HTTP response
        status_code = 401
        headers: dict = {}
        request = None

    def create_repo(self, repo_id, **kwargs):
        raise HfHubHTTPError("401 Client Error: Unauthorized\nInvalid credentials in Authorization header", response=Response())

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    with pytest.raises(ModelError) as info:
        push_folder(export_folder, "st3-test/x", token="hf_bad")
    assert_one_line(info, ModelError, "'st3-test/x'", "HTTP 401", "hf auth whoami")


def test_push_script(export_folder, hub_calls, monkeypatch, capsys):
    from st3_hf.train.cli import push_main
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    assert push_main([str(export_folder), "--repo-id", "st3-test/test-resnet-st3", "--private"]) == 0
    assert "https://huggingface.co/st3-test/test-resnet-st3" in capsys.readouterr().out
    assert hub_calls[0][2]["private"] is True
    assert push_main([str(export_folder), "--repo-id", "not-a-repo-id"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "repo id" in err and err.count("\n") == 1


# ------------------------------------------------------------------ local paths stay local (the real script, a local Hub)
class FakeHub:
    """The Hub endpoints a push uses (create repo, preupload, commit), served on localhost; commits are recorded."""

    def __init__(self):
        import base64
        import http.server
        import json
        import threading

        self.commits, self.validated, self.other = [], [], []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.path.startswith("/api/validate-yaml"):  # the card's metadata, checked before the commit
                    hub.validated.append(json.loads(body)["content"])
                    return self.reply({"errors": [], "warnings": []})
                if self.path.startswith("/api/repos/create"):
                    name = json.loads(body)
                    return self.reply({"url": f"{hub.url}/{name.get('organization')}/{name['name']}"})
                if len(parts) >= 5 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in files]})
                if len(parts) >= 5 and parts[4] == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    hub.commits.append({line["value"]["path"]: base64.b64decode(line["value"]["content"])
                                        for line in lines if line["key"] == "file"})
                    return self.reply({"commitUrl": f"{hub.url}/{parts[2]}/{parts[3]}/commit/{'0' * 40}",
                                       "commitOid": "0" * 40, "pullRequestUrl": None})
                hub.other.append(("POST", self.path))
                self.send_error(404)

            def do_GET(self):
                hub.other.append(("GET", self.path))
                self.send_error(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.slow
def test_pushed_card_and_recipe_name_local_paths_by_their_last_component(tmp_path):
    import subprocess

    from st3_hf.train.recipe_schema import DataConfig, ModelConfig, Recipe
    from train_utils import env

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5, in_chans=3)
    sparsifier = sparsify(model, SparsityConfig(method="st3", target=0.9, end_step=1))
    sparsifier.apply(0.9)
    data_root, run_dir, init = tmp_path / "datasets" / "shapes", tmp_path / "runs" / "shapes_st3", tmp_path / "base_model"
    recipe = Recipe(output_dir=str(run_dir), model=ModelConfig(name="test_resnet", num_classes=5, init_from=str(init)),
                    data=DataConfig(source="imagefolder", root=str(data_root), input_size=[3, 32, 32]))
    folder = export_run(model, sparsifier, run_dir, recipe, data_pretrained_cfg=DATA_CFG)
    local = {"README.md": (folder / "README.md").read_text(), "recipe.yaml": (folder / "recipe.yaml").read_text()}
    assert all(str(data_root) in text and str(init) in text for text in local.values())  # what was pushed before
    before = folder_digest(folder)
    hub = FakeHub()
    try:
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), str(folder),
                               "--repo-id", "st3-test/shapes"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300, env={**env(), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
                                                "HF_TOKEN": "hf_dummy", "HF_HOME": str(tmp_path / "hf_home")})
    finally:
        hub.server.shutdown()
    assert proc.returncode == 0, (proc.stderr[-3000:], hub.other)
    assert f"{data_root} -> shapes" in proc.stdout and f"{run_dir} -> shapes_st3" in proc.stdout
    assert f"{init} -> base_model" in proc.stdout and "pushed to" in proc.stdout
    (pushed,) = hub.commits
    assert sorted(pushed) == sorted(EXPECTED_FILES)
    for name in ("README.md", "recipe.yaml"):
        text = pushed[name].decode()
        assert str(tmp_path) not in text, name
        assert "shapes" in text and "base_model" in text
    assert yaml.safe_load(pushed["recipe.yaml"])["data"]["root"] == "shapes"
    assert yaml.safe_load(pushed["recipe.yaml"])["output_dir"] == "shapes_st3"
    assert pushed["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert folder_digest(folder) == before  # the local export keeps its paths
