"""Model cards of exported sparse models, built from measured values only.

Every number in the card comes from the exported ``config.json`` (sparsity,
MFLOPs, per-layer table) or from the evaluation metrics passed in; a metric that
was not measured is written as "not evaluated", never estimated.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from st3_hf.hub.errors import ExportError

CARD_TAGS = ["image-classification", "timm", "sparse", "st3"]
NOT_EVALUATED = "not evaluated"
PLACEHOLDER_REPO = "ORG/NAME"
# what a caller tells the card about the run, beyond config.json and the metrics
CARD_FACTS = ("repo_id", "dataset_name", "base_model", "paper_expected", "training_data", "init_from", "start_checkpoint")

CITATION = """@inproceedings{vanderschueren2023straight,
  title     = {Are Straight-Through gradients and Soft-Thresholding all you need for Sparse Training?},
  author    = {Vanderschueren, Antoine and De Vleeschouwer, Christophe},
  booktitle = {Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
  year      = {2023}
}"""

METHOD_NAMES = {
    "st3": "ST-3 (straight-through, soft-thresholding, rescaling; global magnitude threshold)",
    "st3_sigma": "ST-3σ (ST-3 with per-layer sigma-normalised threshold)",
    "gmp": "gradual magnitude pruning (hard threshold, masked gradients)",
    "ste_hard": "straight-through estimator with hard thresholding",
    "feather": "Feather (p-norm thresholding, scaled straight-through gradient; global magnitude threshold)",
    "dense": "dense (no pruning)",
}


def find_metric(metrics: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    """``metrics[name]``, also under a prefix such as ``eval/top1`` or ``eval_top1``; None if absent.

    >>> find_metric({"eval/top1": 71.5}, "top1")
    71.5
    """
    if not metrics:
        return None
    candidates = [k for k in metrics if k == name or k.split("/")[-1] == name or k.endswith("_" + name)]
    for key in candidates:
        value = metrics[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def find_accuracy(metrics: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    """A measured accuracy as a fraction in [0, 1] (st3_hf's evaluation convention); None if absent.

    A value above 1 is refused (:class:`~st3_hf.hub.errors.ExportError`) rather than guessed at: it is most likely a percentage.

    >>> find_accuracy({"eval_top1": 0.7603}, "top1")
    0.7603
    """
    value = find_metric(metrics, name)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ExportError(
            f"metric {name}={value} is not a fraction in [0, 1]; st3_hf measures accuracy as a fraction "
            f"(st3_hf.train.evaluation): pass e.g. {name}=0.7603 for 76.03 %"
        )
    return value


def _as_percent(value: Optional[float]) -> Optional[float]:
    # sparsity is stored as a fraction; paper figures may be given either way
    if value is None:
        return None
    return 100.0 * value if value <= 1.0 else float(value)


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return NOT_EVALUATED if value is None else f"{value:.{digits}f}"


def _fmt_or_dash(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def build_model_card(
    config: Mapping[str, Any],
    *,
    metrics: Optional[Mapping[str, Any]] = None,
    paper_expected: Optional[Mapping[str, Any]] = None,
    repo_id: Optional[str] = None,
    license: str = "apache-2.0",
    dataset_name: Optional[str] = None,
    dataset_split: Optional[str] = None,
    base_model: Optional[str] = None,
    recipe_yaml: Optional[str] = None,
    plot_file: Optional[str] = "sparsity_per_layer.png",
    training_data: Optional[str] = None,
    init_from: Optional[str] = None,
    start_checkpoint: Optional[str] = None,
) -> ModelCard:
    """The README of an exported model, from its ``config.json`` content and measured metrics.

    ``metrics`` holds measured top-1 / top-5 accuracy as fractions in [0, 1]
    (keys ``top1`` / ``top5``, optionally prefixed like ``eval_top1``); the
    card shows them in percent.  ``paper_expected`` holds the paper's figures
    (``top1`` and ``sparsity`` in percent, ``mflops``, ``source``) for a
    side-by-side row.  Model-index results are only written for measured
    metrics with a known ``dataset_name``.

        >>> card = build_model_card(config, metrics={"top1": 0.912}, dataset_name="fashion_mnist")  # doctest: +SKIP
        >>> card.save("README.md")  # doctest: +SKIP
    """
    sparsity = config.get("sparsity") or {}
    architecture = str(config.get("architecture", "model"))
    repo = repo_id or PLACEHOLDER_REPO
    model_name = repo_id.split("/")[-1] if repo_id else f"{architecture}-st3-sparse"
    top1 = _as_percent(find_accuracy(metrics, "top1"))  # percent from here on
    top5 = _as_percent(find_accuracy(metrics, "top5"))

    eval_results: List[EvalResult] = []
    if dataset_name:
        for metric_type, metric_name, value in (
            ("accuracy", "Top-1 accuracy", top1),
            ("top_5_accuracy", "Top-5 accuracy", top5),
        ):
            if value is not None:
                eval_results.append(
                    EvalResult(
                        task_type="image-classification",
                        task_name="Image Classification",
                        dataset_type=dataset_name,
                        dataset_name=dataset_name,
                        dataset_split=dataset_split,
                        metric_type=metric_type,
                        metric_name=metric_name,
                        metric_value=round(value, 2),  # percent
                    )
                )
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=list(CARD_TAGS),
        license=license,
        datasets=[dataset_name] if dataset_name else None,
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    body = _body(
        config, sparsity, architecture, repo, model_name, top1, top5, paper_expected,
        dataset_name, dataset_split, base_model, recipe_yaml, plot_file, training_data, init_from,
        start_checkpoint,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _body(
    config: Mapping[str, Any],
    sparsity: Mapping[str, Any],
    architecture: str,
    repo: str,
    model_name: str,
    top1: Optional[float],
    top5: Optional[float],
    paper_expected: Optional[Mapping[str, Any]],
    dataset_name: Optional[str],
    dataset_split: Optional[str],
    base_model: Optional[str],
    recipe_yaml: Optional[str],
    plot_file: Optional[str],
    training_data: Optional[str] = None,
    init_from: Optional[str] = None,
    start_checkpoint: Optional[str] = None,
) -> str:
    method = sparsity.get("method", "unknown")
    achieved = sparsity.get("achieved_sparsity")
    pretrained_cfg = config.get("pretrained_cfg", {})
    input_size = sparsity.get("flops_input_size") or pretrained_cfg.get("input_size")
    lines: List[str] = [f"# {model_name}", ""]
    lines.append(
        f"A sparse `{architecture}` image classifier trained with "
        f"{METHOD_NAMES.get(method, method)} with st3_hf (a timm port of the reference code "
        "[vanderschuea/stthree](https://github.com/vanderschuea/stthree)) "
        f"(criterion `{sparsity.get('criterion', '?')}`, target sparsity {_fmt_or_dash(_as_percent(sparsity.get('target')))} %)."
    )
    if start_checkpoint:
        where = f"[`{start_checkpoint}`](https://huggingface.co/{start_checkpoint})" if start_checkpoint == base_model else f"`{start_checkpoint}`"
        lines.append(f"Sparsified from the dense pretrained checkpoint {where} (masks learned while fine-tuning from its weights).")
    elif base_model:
        lines.append(f"Fine-tuned from [`{base_model}`](https://huggingface.co/{base_model}).")
    elif init_from:
        lines.append(f"Fine-tuned from the local model `{init_from}` (not published on the Hub).")
    if training_data:
        lines.append(f"Trained on {training_data}.")
    recipe = sparsity.get("recipe") or {}
    if recipe.get("description"):
        lines += ["", f"Recipe: **{recipe.get('name') or 'recipe'}**: {recipe['description']}"]
    lines.append("")
    lines.append(
        "The weights are stored dense (with exact zeros) in `model.safetensors`, loadable by plain timm, "
        "and bitmask-compressed in `model.sparse.safetensors` (see st3_hf's `docs/compact_format.md`)."
    )

    # ------------------------------------------------------------------ results
    lines += ["", "## Results", ""]
    where = dataset_name or "the evaluation data"
    if dataset_split:
        where += f" ({dataset_split} split)"
    if top1 is None and top5 is None:
        lines.append(f"Accuracy: {NOT_EVALUATED}.")
    else:
        lines.append(f"Accuracy measured on {where}.")
    size_txt = "x".join(str(s) for s in input_size) if input_size else "?"
    lines.append(
        f"MFLOPs are millions of multiply-accumulates of the conv and linear layers at {size_txt} input; "
        "a pruned layer counts its dense MACs times its density."
    )
    lines += [
        "",
        "| | Top-1 (%) | Top-5 (%) | Sparsity (%) | MFLOPs | Dense MFLOPs |",
        "|---|---|---|---|---|---|",
        f"| this model (measured) | {_fmt(top1)} | {_fmt(top5)} | {_fmt(_as_percent(achieved))} | "
        f"{_fmt(sparsity.get('sparse_mflops'))} | {_fmt(sparsity.get('dense_mflops'))} |",
    ]
    if paper_expected and any(paper_expected.get(k) is not None for k in ("top1", "sparsity", "mflops")):
        source = paper_expected.get("source") or "Vanderschueren & De Vleeschouwer, WACV 2023"
        lines.append(
            f"| paper ({source}) | {_fmt_or_dash(_as_percent(paper_expected.get('top1')))} | — | "
            f"{_fmt_or_dash(_as_percent(paper_expected.get('sparsity')))} | {_fmt_or_dash(paper_expected.get('mflops'), 0)} | — |"
        )

    if sparsity.get("num_parameters"):
        lines += [
            "",
            f"Sparsity is the share of zeros among the {sparsity.get('num_prunable_weights', '?')} prunable conv/linear "
            f"weights; over all {sparsity['num_parameters']} parameters (biases, norms, embeddings and dense layers "
            f"included) it is {_fmt(_as_percent(sparsity.get('achieved_sparsity_all_params')))} %.",
        ]
        unread = sparsity.get("unread_layers") or {}
        if unread:
            lines.append(
                "Never read in training (their zeros save nothing): "
                + ", ".join(f"`{n}` ({_fmt(_as_percent(v))} % of the prunable weights)" for n, v in unread.items())
                + "."
            )

    # ------------------------------------------------------------------ per layer
    per_layer: Mapping[str, Mapping[str, Any]] = sparsity.get("per_layer") or {}
    lines += ["", "## Sparsity per layer", ""]
    if plot_file:
        lines += [f"![Sparsity per layer]({plot_file})", ""]
    lines += ["| layer | weights | sparsity (%) | dense MFLOPs | sparse MFLOPs |", "|---|---|---|---|---|"]
    for name, info in per_layer.items():
        lines.append(
            f"| `{name}` | {info.get('num_weights', '?')} | {_fmt(_as_percent(info.get('sparsity')))} | "
            f"{_fmt_or_dash(info.get('dense_mflops'), 4)} | {_fmt_or_dash(info.get('sparse_mflops'), 4)} |"
        )
    excluded = (sparsity.get("config") or {}).get("exclude") or []
    if excluded:
        lines += ["", f"Layers kept dense (excluded from pruning): {', '.join(f'`{p}`' for p in excluded)}."]

    # ------------------------------------------------------------------ usage
    mean = pretrained_cfg.get("mean")
    std = pretrained_cfg.get("std")
    lines += [
        "",
        "## How to use",
        "",
        "With timm alone (a dense model whose pruned weights are exact zeros):",
        "",
        "```python",
        "import timm",
        "",
        f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
        "data_config = timm.data.resolve_model_data_config(model)",
        "transform = timm.data.create_transform(**data_config, is_training=False)",
        "```",
        "",
        "With st3_hf, to get the masks back (frozen) and fine-tune sparsely:",
        "",
        "```python",
        "import st3_hf",
        "",
        f'model, sparsifier = st3_hf.from_pretrained("{repo}")  # masks = the non-zeros, frozen',
        f'# new task: model, sparsifier = st3_hf.from_pretrained("{repo}", num_classes=10, head="dense")',
        "# optimizer = sparsifier.wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))",
        "```",
        "",
        f"Preprocessing recorded in `config.json`: input size {pretrained_cfg.get('input_size')}, "
        f"mean {mean}, std {std}, interpolation `{pretrained_cfg.get('interpolation')}`, "
        f"crop_pct {pretrained_cfg.get('crop_pct')}, crop_mode `{pretrained_cfg.get('crop_mode')}`.",
    ]

    # ------------------------------------------------------------------ recipe
    lines += ["", "## Training recipe", ""]
    if recipe_yaml:
        lines += ["The resolved recipe (`recipe.yaml`):", "", "```yaml", recipe_yaml.rstrip(), "```"]
    else:
        lines.append("No recipe was recorded with this export.")
    lines += ["", f"Exported with st3_hf {sparsity.get('st3_hf_version', '?')}.", ""]

    # ------------------------------------------------------------------ citation
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)
