"""Model cards of exported sparse models, from ``config.json`` and measured metrics only ("not evaluated" if not)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from st3_hf.errors import ModelError

NOT_EVALUATED = "not evaluated"
# what a caller tells the card about the run, beyond config.json and the metrics
CARD_FACTS = ("repo_id", "dataset_name", "base_model", "paper_expected", "training_data", "init_from",
              "start_checkpoint", "run")
# a run "reached" its target when its zeros are within this fraction of it (a quantile rounds to whole weights)
TARGET_SLACK = 0.005
METHOD_NAMES = {
    "st3": "ST-3 (straight-through, soft-thresholding, rescaling; global magnitude threshold)",
    "st3_sigma": "ST-3σ (ST-3 with per-layer sigma-normalised threshold)",
    "gmp": "gradual magnitude pruning (hard threshold, masked gradients)",
    "ste_hard": "straight-through estimator with hard thresholding",
    "feather": "Feather (p-norm thresholding, scaled straight-through gradient; global magnitude threshold)",
}

CARD_TEMPLATE = """# {model_name}

A `{architecture}` image classifier with {sparsity} % of its prunable weights at zero (target {target} %), trained \
with {method} with st3_hf (a timm port of the reference code \
[vanderschuea/stthree](https://github.com/vanderschuea/stthree)) (criterion `{criterion}`){run}.
{short_of_target}{origin}
The weights are stored dense (with exact zeros) in `model.safetensors`, loadable by plain timm, and bitmask-compressed \
in `model.sparse.safetensors` (see st3_hf's `docs/compact_format.md`).

## Results

{accuracy_line}
MFLOPs are millions of multiply-accumulates of the conv and linear layers at {input_size} input; a pruned layer counts \
its dense MACs times its density.

| | Top-1 (%) | Top-5 (%) | Sparsity (%) | MFLOPs | Dense MFLOPs |
|---|---|---|---|---|---|
| this model (measured) | {top1} | {top5} | {sparsity} | {sparse_mflops} | {dense_mflops} |
{paper_row}{all_params}
## Sparsity per layer

![Sparsity per layer](sparsity_per_layer.png)

| layer | weights | sparsity (%) | dense MFLOPs | sparse MFLOPs |
|---|---|---|---|---|
{layer_rows}{excluded}
## How to use

With timm alone (a dense model whose pruned weights are exact zeros):

```python
import timm

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
```

With st3_hf, to get the masks back (frozen) and fine-tune sparsely:

```python
import st3_hf

model, sparsifier = st3_hf.from_pretrained("{repo}")  # masks = the non-zeros, frozen
# new task: model, sparsifier = st3_hf.from_pretrained("{repo}", num_classes=10, head="dense")
# optimizer = sparsifier.wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
```

Preprocessing recorded in `config.json`: input size {cfg[input_size]}, mean {cfg[mean]}, std {cfg[std]}, interpolation \
`{cfg[interpolation]}`, crop_pct {cfg[crop_pct]}, crop_mode `{cfg[crop_mode]}`.

## Training recipe

{recipe}

Exported with st3_hf {version}.

## Citation

```bibtex
@inproceedings{{vanderschueren2023straight,
  title     = {{Are Straight-Through gradients and Soft-Thresholding all you need for Sparse Training?}},
  author    = {{Vanderschueren, Antoine and De Vleeschouwer, Christophe}},
  booktitle = {{Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)}},
  year      = {{2023}}
}}
```
"""


def find_metric(metrics: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    """``metrics[name]``, also under a prefix such as ``eval/top1`` or ``eval_top1``; None if absent.

    >>> find_metric({"eval/top1": 71.5}, "top1")
    71.5
    """
    return next((float(value) for key, value in (metrics or {}).items()
                 if (key == name or key.split("/")[-1] == name or key.endswith("_" + name))
                 and isinstance(value, (int, float)) and not isinstance(value, bool)), None)


def find_accuracy(metrics: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    """A measured accuracy as a fraction in [0, 1]; a value above 1 (a percentage?) is refused, not guessed at.

    >>> find_accuracy({"eval_top1": 0.7603}, "top1")
    0.7603
    """
    if (value := find_metric(metrics, name)) is not None and not 0.0 <= value <= 1.0:
        raise ModelError(f"metric {name}={value} is not a fraction in [0, 1]; st3_hf measures accuracy as a fraction "
                         f"(st3_hf.train.evaluation): pass e.g. {name}=0.7603 for 76.03 %")
    return value


def _percent(value: Optional[float]) -> Optional[float]:  # paper figures may already be percentages
    return None if value is None else (100.0 * value if value <= 1.0 else float(value))


def _fmt(value: Optional[float], digits: int = 2, missing: str = NOT_EVALUATED) -> str:
    return missing if value is None else f"{value:.{digits}f}"


def build_model_card(config: Mapping[str, Any], *, metrics: Optional[Mapping[str, Any]] = None,
                     paper_expected: Optional[Mapping[str, Any]] = None, repo_id: Optional[str] = None,
                     license: str = "apache-2.0", dataset_name: Optional[str] = None,
                     dataset_split: Optional[str] = None, base_model: Optional[str] = None,
                     recipe_yaml: Optional[str] = None, training_data: Optional[str] = None,
                     init_from: Optional[str] = None, start_checkpoint: Optional[str] = None,
                     run: Optional[Mapping[str, Any]] = None) -> ModelCard:
    """The README of an exported model, from its ``config.json`` content and measured metrics.

    ``metrics``: top-1 / top-5 as fractions and ``eval_examples`` (images measured on); ``paper_expected``: the
    paper's ``top1`` / ``sparsity`` (percent), ``mflops`` and ``source``; ``run``: ``steps``, ``epochs``,
    ``planned_epochs``, ``images_seen`` of the run, said in the headline.

        >>> card = build_model_card(config, metrics={"top1": 0.912}, dataset_name="fashion_mnist")  # doctest: +SKIP
        >>> card.save("README.md")  # doctest: +SKIP
    """
    sparsity, cfg = config.get("sparsity") or {}, config.get("pretrained_cfg", {})
    architecture = str(config.get("architecture", "model"))
    model_name = repo_id.split("/")[-1] if repo_id else f"{architecture}-st3-sparse"
    top1, top5 = _percent(find_accuracy(metrics, "top1")), _percent(find_accuracy(metrics, "top5"))
    measured = (("accuracy", "Top-1 accuracy", top1), ("top_5_accuracy", "Top-5 accuracy", top5))
    results = [EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_name,
                          dataset_name=dataset_name, dataset_split=dataset_split, metric_type=kind, metric_name=label,
                          metric_value=round(value, 2))
               for kind, label, value in measured if value is not None and dataset_name]
    card_data = ModelCardData(library_name="timm", pipeline_tag="image-classification", license=license,
                              tags=["image-classification", "timm", "sparse", "st3"], base_model=base_model,
                              datasets=[dataset_name] if dataset_name else None, model_name=model_name,
                              eval_results=results or None)
    link = f"https://huggingface.co/{start_checkpoint or base_model}"
    origin = ([f"Sparsified from the dense pretrained checkpoint "
               f"{f'[`{start_checkpoint}`]({link})' if start_checkpoint == base_model else f'`{start_checkpoint}`'} "
               "(masks learned while fine-tuning from its weights)."] if start_checkpoint
              else [f"Fine-tuned from [`{base_model}`]({link})."] if base_model
              else [f"Fine-tuned from the local model `{init_from}` (not published on the Hub)."] if init_from else [])
    origin += [f"Trained on {training_data}."] if training_data else []
    recipe = sparsity.get("recipe") or {}
    if recipe.get("description"):
        origin += ["", f"Recipe: **{recipe.get('name') or 'recipe'}**: {recipe['description']}"]
    where = (dataset_name or "the evaluation data") + (f" ({dataset_split} split)" if dataset_split else "")
    examples = find_metric(metrics, "eval_examples")
    where = f"{int(examples)} images of {where}" if examples is not None else where
    achieved, target = sparsity.get("achieved_sparsity"), sparsity.get("target")
    short = achieved is not None and target is not None and achieved < target - TARGET_SLACK
    said = ", ".join(([f"{run['epochs']:.3g} of {run['planned_epochs']} planned epochs"] if "epochs" in run else [])
                     + ([f"{run['images_seen']} training images seen"] if "images_seen" in run else [])) if run else ""
    paper = paper_expected or {}
    all_params = "" if not sparsity.get("num_parameters") else (
        f"\nSparsity is the share of zeros among the {sparsity.get('num_prunable_weights', '?')} prunable conv/linear "
        f"weights; over all {sparsity['num_parameters']} parameters (biases, norms, embeddings and dense layers "
        f"included) it is {_fmt(_percent(sparsity.get('achieved_sparsity_all_params')))} %.\n") + (
        "Never read in training (their zeros save nothing): " + ", ".join(
            f"`{n}` ({_fmt(_percent(v))} % of the prunable weights)" for n, v in sparsity["unread_layers"].items())
        + ".\n" if sparsity.get("unread_layers") else "")
    excluded = (sparsity.get("config") or {}).get("exclude") or []
    input_size = sparsity.get("flops_input_size") or cfg.get("input_size")
    body = CARD_TEMPLATE.format(
        model_name=model_name, architecture=architecture, criterion=sparsity.get("criterion", "?"),
        method=METHOD_NAMES.get(sparsity.get("method"), sparsity.get("method", "unknown")),
        target=_fmt(_percent(target), missing="—"), origin="\n".join(origin) + "\n" if origin else "",
        run=(f", for {run['steps']} optimizer steps" + (f" ({said})" if said else "")) if run else "",
        short_of_target=(f"\n**This run ended before reaching its target sparsity: {_fmt(_percent(achieved))} % of "
                         f"the prunable weights are zero, not {_fmt(_percent(target))} %.**\n") if short else "",
        accuracy_line=(f"Accuracy: {NOT_EVALUATED}." if top1 is None and top5 is None
                       else f"Accuracy measured on {where}."),
        input_size="x".join(str(s) for s in input_size) if input_size else "?",
        top1=_fmt(top1), top5=_fmt(top5), sparsity=_fmt(_percent(achieved)),
        sparse_mflops=_fmt(sparsity.get("sparse_mflops")), dense_mflops=_fmt(sparsity.get("dense_mflops")),
        paper_row=(f"| paper ({paper.get('source') or 'Vanderschueren & De Vleeschouwer, WACV 2023'}) | "
                   f"{_fmt(_percent(paper.get('top1')), missing='—')} | — | "
                   f"{_fmt(_percent(paper.get('sparsity')), missing='—')} | "
                   f"{_fmt(paper.get('mflops'), 0, '—')} | — |\n"
                   if any(paper.get(k) is not None for k in ("top1", "sparsity", "mflops")) else ""),
        all_params=all_params, layer_rows="".join(
            f"| `{name}` | {info.get('num_weights', '?')} | {_fmt(_percent(info.get('sparsity')))} | "
            f"{_fmt(info.get('dense_mflops'), 4, '—')} | {_fmt(info.get('sparse_mflops'), 4, '—')} |\n"
            for name, info in (sparsity.get("per_layer") or {}).items()),
        excluded=(f"\nLayers kept dense (excluded from pruning): {', '.join(f'`{p}`' for p in excluded)}.\n"
                  if excluded else ""),
        repo=repo_id or "ORG/NAME", cfg=defaultdict(lambda: None, cfg), version=sparsity.get("st3_hf_version", "?"),
        recipe=(f"The resolved recipe (`recipe.yaml`):\n\n```yaml\n{recipe_yaml.rstrip()}\n```" if recipe_yaml
                else "No recipe was recorded with this export."))
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
