"""The recipe files and accelerate configs shipped in recipes/: they load, carry the reference
hyper-parameters, and the ImageNet recipes quote the paper's table (parsed from docs/method.md)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from st3_hf.train.modeling import create_model
from st3_hf.train.recipe import global_batch_size, keys_given, load_recipe, recipe_to_yaml, resolve_lr, save_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
BASE_FILES = sorted((RECIPES / "base").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))
# the paper's 100-epoch runs from scratch; r50_*_from_pretrained.yaml prune timm's dense weights instead
R50_FILES = [p for p in RECIPE_FILES if p.name.startswith("r50_") and not p.stem.endswith("_from_pretrained")]
FROM_PRETRAINED_FILES = [p for p in RECIPE_FILES if p.stem.endswith("_from_pretrained")]
FMNIST_FILES = [p for p in RECIPE_FILES if p.name.startswith("fmnist_")]

# the method page, with the paper's ResNet-50 table, ships in the repository
METHOD_PAGE = REPO / "docs" / "method.md"
TABLE_SOURCE = "ST-3 paper, Table (ImageNet ResNet-50, 100 epochs)"
# docs/method.md: the Feather paper reports "76.93 % top-1 at 90 % sparsity" for ImageNet ResNet-50
FEATHER_PAPER = {"r50_feather_90": (76.93, 90.0)}


def ids(paths):
    return [p.name for p in paths]


def test_all_expected_recipe_files_exist():
    names = {p.stem for p in RECIPE_FILES}
    sparsities = ["80", "90", "95", "96p5", "98", "99"]
    expected = {f"r50_{m}_{s}" for m in ("st3", "st3sigma") for s in sparsities}
    expected |= {"r50_dense", "r50_gmp_90", "r50_gmp_98", "quickstart", "finetune_quickstart",
                 "finetune_r50_st3_98_imagefolder", "fmnist_dense", "r50_st3_90_from_pretrained",
                 "r50_st3_98_from_pretrained", "quickstart_from_pretrained", "transfer_r50_st3_90_imagefolder"}
    expected |= {f"fmnist_{m}_{s}" for m in ("st3", "st3sigma", "gmp", "feather") for s in ("90", "95", "98", "99")}
    expected |= {f"r50_feather_{s}" for s in ("90", "95", "98", "99")}
    expected |= {"r50_probmask_90", "r50_lrr_90", "fmnist_probmask_90", "fmnist_lrr_90"}
    assert expected <= names, sorted(expected - names)
    assert {p.name for p in ACCELERATE_CONFIGS} >= {
        "cpu.yaml", "single_gpu.yaml", "multi_gpu.yaml", "multinode.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml",
        "fsdp2.yaml",
    }


# --------------------------------------------------------------------------- every recipe

@pytest.mark.parametrize("path", RECIPE_FILES + BASE_FILES, ids=ids(RECIPE_FILES + BASE_FILES))
def test_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    saved = save_recipe(recipe, tmp_path / "resolved.yaml")
    assert load_recipe(saved) == recipe
    assert recipe_to_yaml(load_recipe(saved)) == recipe_to_yaml(recipe)
    assert global_batch_size(recipe, 1) >= 1 and resolve_lr(recipe, 1) > 0


@pytest.mark.parametrize("path", RECIPE_FILES, ids=ids(RECIPE_FILES))
def test_smoke_overrides_work_on_every_recipe(path):
    recipe = load_recipe(path, ["training.max_steps=20", "output_dir=/tmp/x"])
    assert recipe.training.max_steps == 20
    assert recipe.output_dir == "/tmp/x"
    untouched = load_recipe(path)
    assert untouched.training.max_steps is None  # no shipped recipe caps its steps


@pytest.mark.parametrize("path", RECIPE_FILES, ids=ids(RECIPE_FILES))
def test_recipe_header_says_what_how_and_expected(path):
    text = path.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header_text = "\n".join(header)
    assert len(header) >= 3, "every recipe starts with a comment block"
    assert f"scripts/train.py recipes/{path.name}" in header_text
    assert "accelerate launch" in header_text
    assert "Expected" in header_text
    assert load_recipe(path).description, "a one-line description for logs and cards"


@pytest.mark.parametrize("path", R50_FILES + FMNIST_FILES, ids=ids(R50_FILES + FMNIST_FILES))
def test_file_name_matches_method_target_and_output_dir(path):
    recipe = load_recipe(path)
    family, method, *rest = path.stem.split("_")
    method = {"st3sigma": "st3_sigma"}.get(method, method)
    if method == "lrr":  # learning-rate rewinding of an ST-3 run (the reference's ImageNet config)
        assert (recipe.sparsity.method, recipe.sparsity.schedule) == ("st3", "lrr")
    else:
        assert recipe.sparsity.method == method
    if method == "dense":
        assert recipe.sparsity.target == 0.0
    else:
        assert recipe.sparsity.target == pytest.approx(float(rest[0].replace("p", ".")) / 100, abs=1e-12)
    expected_dir = f"outputs/{path.stem}" if family == "r50" else f"outputs/fmnist/{path.stem}"
    assert recipe.output_dir == expected_dir


# --------------------------------------------------------------------------- ImageNet ResNet-50

@pytest.mark.parametrize("path", R50_FILES, ids=ids(R50_FILES))
def test_r50_reference_hyperparameters(path):
    r = load_recipe(path)
    assert (r.model.name, r.model.num_classes, r.model.in_chans) == ("resnet50", 1000, 3)
    assert r.model.bn_momentum == 0.01 and r.model.channels_last
    assert r.model.init_from is None
    assert r.training.epochs == 100
    assert (r.optimizer.name, r.optimizer.momentum, r.optimizer.weight_decay) == ("sgd", 0.875, 5e-5)
    assert r.optimizer.lr is None  # linear scaling rule ...
    assert r.optimizer.base_lr * 512 / r.optimizer.base_batch_size == pytest.approx(0.2)  # ... 0.2 per 512
    assert (r.lr_schedule.name, r.lr_schedule.warmup_epochs) == ("cosine", 5.0)
    assert r.training.label_smoothing == 0.1 and r.training.grad_clip == 3.0
    assert r.training.mixed_precision == "bf16"
    assert r.training.gradient_accumulation_steps == 1
    # only random-resized-crop and horizontal flip
    assert r.data.random_crop_padding == 0 and r.data.hflip == 0.5
    assert r.data.scale == [0.08, 1.0] and r.data.ratio == pytest.approx([3 / 4, 4 / 3])
    assert r.data.input_size == [3, 224, 224]
    assert (r.data.source, r.data.root) == ("imagefolder", "/data/imagenet")
    assert r.data.batch_size == 256 and r.data.num_workers == 8
    assert (r.sparsity.start_epoch, r.sparsity.end_epoch, r.sparsity.power) == (5.0, 50.0, 3.0)
    assert r.sparsity.exclude == []  # first conv and classifier are pruned too
    assert r.hub.dataset_name == "imagenet-1k"
    # 8 GPUs x 256: global batch 2048 -> lr 0.8; the paper's 512 -> 0.2
    assert resolve_lr(r, 8) == pytest.approx(0.8) and resolve_lr(r, 2) == pytest.approx(0.2)


@pytest.mark.parametrize("path", R50_FILES, ids=ids(R50_FILES))
def test_r50_recipes_share_the_base(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["inherit"] == "base/r50_imagenet.yaml"
    assert set(raw) <= {"inherit", "description", "output_dir", "sparsity", "expected"}


def test_r50_base_mentions_hf_imagenet_switch():
    text = (RECIPES / "base" / "r50_imagenet.yaml").read_text(encoding="utf-8")
    for needle in ("source: hf", "hf_name: imagenet-1k", "eval_split: validation"):
        assert needle in text


def parse_paper_table(text: str) -> dict:
    """``{recipe stem: (top1, sparsity %, mflops)}`` from the markdown table of the method page."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*method\s*\|\s*top-1", line))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    assert header == ["method", "top-1 %", "sparsity %", "MFLOPs"], header
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        method, top1, sparsity, mflops = (c.strip() for c in line.strip().strip("|").split("|"))
        if method == "dense baseline":
            stem = "r50_dense"
        else:
            family = {"ST-3": "st3", "ST-3σ": "st3sigma"}[method]
            stem = f"r50_{family}_{sparsity.replace('.', 'p')}"
        table[stem] = (float(top1), float(sparsity), float(mflops))
    return table


def test_expected_numbers_equal_the_paper_table():
    table = parse_paper_table(METHOD_PAGE.read_text(encoding="utf-8"))
    assert len(table) == 13  # dense + 6 sparsities x 2 methods
    for stem, (top1, sparsity, mflops) in table.items():
        recipe = load_recipe(RECIPES / f"{stem}.yaml")
        assert (recipe.expected.top1, recipe.expected.sparsity, recipe.expected.mflops) == (top1, sparsity, mflops), stem
        assert recipe.expected.source == TABLE_SOURCE
        # expected.sparsity is in percent, sparsity.target a fraction
        assert recipe.sparsity.target == pytest.approx(sparsity / 100, abs=1e-12)
    table_stems = set(table)
    for path in R50_FILES:
        if path.stem not in table_stems:  # baselines and later methods: not in the ST-3 paper's table
            expected = load_recipe(path).expected
            if path.stem in FEATHER_PAPER:  # the Feather paper's own figure (docs/method.md)
                assert (expected.top1, expected.sparsity) == FEATHER_PAPER[path.stem], path.name
                assert expected.source.startswith("Feather paper"), path.name
                continue
            assert (expected.top1, expected.sparsity, expected.mflops, expected.source) == (None,) * 4, path.name


# --------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("path", FMNIST_FILES, ids=ids(FMNIST_FILES))
def test_fmnist_family(path):
    r = load_recipe(path)
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["inherit"] == "base/fmnist.yaml"
    assert (r.data.source, r.data.input_size, r.model.in_chans, r.model.num_classes) == ("fashion_mnist", [1, 28, 28], 1, 10)
    assert r.data.device_resident and r.training.mixed_precision == "bf16"
    assert (r.sparsity.start_epoch, r.sparsity.end_epoch) == (2.0, 20.0)
    assert r.sparsity.end_epoch <= r.training.epochs * 2 / 3 + 1e-9  # ramp over ~2/3 of training
    assert r.hub.dataset_name == "fashion_mnist"


def test_quickstart_values():
    r = load_recipe(RECIPES / "quickstart.yaml")
    assert (r.data.source, r.data.root) == ("fashion_mnist", "/usr/share/datasets/fashion-mnist")
    assert r.data.input_size == [1, 28, 28] and r.data.mean == [0.2860] and r.data.std == [0.3530]
    assert (r.data.random_crop_padding, r.data.hflip, r.data.crop_pct) == (2, 0.5, 1.0)
    assert (r.model.name, r.model.num_classes, r.model.in_chans) == ("resnet10t", 10, 1)
    assert (r.sparsity.method, r.sparsity.target) == ("st3", 0.9)
    assert r.sparsity.start_epoch < r.sparsity.end_epoch <= r.training.epochs
    assert r.training.mixed_precision == "no" and r.training.grad_clip == 3.0
    assert r.logging.trackers == ["tensorboard"] and r.output_dir == "outputs/quickstart"
    assert (r.hub.dataset_name, r.hub.license) == ("fashion_mnist", "apache-2.0")


def test_finetune_recipes_start_from_a_checkpoint():
    quick = load_recipe(RECIPES / "finetune_quickstart.yaml")
    # relative to the recipe file (like inherit:): the quickstart's output folder next to recipes/
    assert quick.model.init_from == str((REPO / load_recipe(RECIPES / "quickstart.yaml").output_dir).absolute())
    assert (quick.data.source, quick.training.epochs, quick.model.num_classes) == ("fashion_mnist", 1, 10)
    r50 = load_recipe(RECIPES / "finetune_r50_st3_98_imagefolder.yaml")
    assert r50.model.init_from and r50.hub.base_model == r50.model.init_from
    assert (r50.sparsity.method, r50.sparsity.target) == ("st3", 0.98)
    assert (r50.data.source, r50.data.root) == ("imagefolder", "/data/downstream")
    assert r50.training.epochs < 100


@pytest.mark.parametrize("path", FROM_PRETRAINED_FILES, ids=ids(FROM_PRETRAINED_FILES))
def test_from_pretrained_recipes_prune_a_dense_start_on_a_short_schedule(path):
    r = load_recipe(path)
    assert r.model.pretrained and r.model.init_from is None
    # no preprocessing in the recipe: the start's pretrained_cfg provides it
    assert not {"input_size", "mean", "std", "interpolation", "crop_pct"} & keys_given(r.data)
    assert r.sparsity.method == "st3" and r.sparsity.end_epoch < r.training.epochs  # recovery at the target
    family, method, target, *_ = path.stem.split("_")
    if family == "r50":
        assert r.model.pretrained == "timm/resnet50.a1_in1k" and r.model.name == "resnet50"
        assert r.sparsity.target == pytest.approx(int(target) / 100)
        assert r.training.epochs < 100 and r.sparsity.start_epoch < 5  # shorter than the paper's run from scratch
        assert (r.data.source, r.data.root, r.model.num_classes) == ("imagefolder", "/data/imagenet", 1000)
        assert r.output_dir == f"outputs/{path.stem}"


def test_transfer_and_quickstart_from_pretrained_values():
    transfer = load_recipe(RECIPES / "transfer_r50_st3_90_imagefolder.yaml")
    assert transfer.model.pretrained == "timm/resnet50.a1_in1k" and transfer.model.num_classes != 1000
    assert (transfer.model.head, transfer.data.source, transfer.sparsity.target) == ("dense", "imagefolder", 0.9)
    quick = load_recipe(RECIPES / "quickstart_from_pretrained.yaml")
    scratch = load_recipe(RECIPES / "quickstart.yaml")
    # the dense quickstart run (RESULTS.md), resolved against the recipe's folder like inherit:
    assert quick.model.pretrained == str((REPO / "outputs" / "quickstart_dense").resolve())
    assert (quick.model.name, quick.model.num_classes, quick.sparsity.target) == (scratch.model.name, 10, 0.9)
    assert quick.training.epochs < scratch.training.epochs


@pytest.mark.parametrize("name", ["quickstart.yaml", "fmnist_st3_90.yaml"])
def test_small_models_build_and_run_on_28x28(name):
    # the timm model and kwargs of the recipe really work on 1x28x28 input
    recipe = load_recipe(RECIPES / name)
    model = create_model(recipe.model).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, *recipe.data.input_size))
    assert logits.shape == (2, recipe.model.num_classes)


# --------------------------------------------------------------------------- accelerate configs

@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=ids(ACCELERATE_CONFIGS))
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(path)
    expected_type = {
        "cpu.yaml": DistributedType.NO,
        "single_gpu.yaml": DistributedType.NO,
        "multi_gpu.yaml": DistributedType.MULTI_GPU,
        "multinode.yaml": DistributedType.MULTI_GPU,
        "deepspeed_zero1.yaml": DistributedType.DEEPSPEED,
        "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
        "fsdp2.yaml": DistributedType.FSDP,
    }
    if path.name in expected_type:
        assert config.distributed_type == expected_type[path.name]
    if path.name == "multi_gpu.yaml":
        assert (config.num_machines, config.num_processes) == (1, 8)
    if path.name == "multinode.yaml":
        assert (config.num_machines, config.num_processes) == (2, 16)
        assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
    if path.name.startswith("deepspeed_zero"):
        ds = config.deepspeed_config
        assert ds["zero_stage"] == int(path.stem[-1])
        assert ds["gradient_clipping"] == 3.0
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        assert config.mixed_precision == "bf16"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=ids(ACCELERATE_CONFIGS))
def test_accelerate_launch_accepts_config(path):
    # what `accelerate launch --config_file ...` does with the file, short of starting processes
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in config.get("deepspeed_config", {}):
        assert key in known, f"{key} is not an accelerate launch DeepSpeed option"
    args = parser.parse_args(["--config_file", str(path), "scripts/train.py", "recipes/quickstart.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == config["num_processes"]
    assert args.use_deepspeed == (config["distributed_type"] == "DEEPSPEED")
    assert args.use_fsdp == (config["distributed_type"] == "FSDP")
    if "fsdp_config" in config:
        assert args.fsdp_version == 2 and args.fsdp_state_dict_type == "SHARDED_STATE_DICT"
    if "deepspeed_config" in config:
        assert args.zero_stage == config["deepspeed_config"]["zero_stage"]
        assert args.gradient_clipping == config["deepspeed_config"]["gradient_clipping"]


def test_multinode_cli_overrides_rank_and_address():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = RECIPES / "accelerate_configs" / "multinode.yaml"
    argv = ["--config_file", str(path), "--machine_rank", "1", "--main_process_ip", "192.168.7.7",
            "scripts/train.py", "recipes/r50_st3_90.yaml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert (args.machine_rank, args.main_process_ip, args.num_machines) == (1, "192.168.7.7", 2)
    text = path.read_text(encoding="utf-8")
    assert "--machine_rank" in text and "--main_process_ip" in text
