"""The training loop: a recipe in, a trained, frozen, exported sparse model out.

Accelerate handles devices, DDP / multi-node, mixed precision, gradient
accumulation and DeepSpeed; the :class:`~st3_hf.Sparsifier` advances once per
real optimizer update (through the wrapped optimizer, or explicitly under
DeepSpeed, where the update happens inside the engine).
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import math
import signal
import sys
import threading
import time
import warnings
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .best_weights import BestWeights
from .checkpointing import CheckpointManager, read_trainer_state
from .engines import (
    accelerator_device_kwargs,
    check_engine_engaged,
    deepspeed_zero_stage,
    refuse_before_start,
    requested_engine,
)
from .errors import CheckpointError, EngineError, OutputDirError, describe_cause
from .evaluation import evaluate_model
from .flops import count_macs
from .metrics_log import JsonlLogger
from .lrr import Phase, phase_at, total_epochs, training_phases
from .modeling import create_model, create_pretrained_model, sparsity_config, sparsity_config_for_start, with_start_preprocessing
from .nonfinite import NonFiniteGuard
from .optim import build_lr_scheduler, build_optimizer
from .data.sources import UNREADABLE_LABEL, check_num_classes
from .init_source import check_init_from
from .preflight import SpaceEstimate, check_model_name, check_output_dir, count_parameters
from .progress import make_progress
from .recipe import load_recipe, resolve_lr, save_recipe
from .recipe_schema import Recipe
from .resume_guard import check_resume_recipe
from .run_description import describe_overrides
from .sparsifier import Sparsifier, sparsify
from .state_io import load_sparsifier_state, save_sparsifier_state

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint (``trainer_state.json``)."""

    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed
    global_step: int = 0  # optimizer steps taken (gradient-accumulation boundaries)
    log_records: int = 0  # lines of metrics.jsonl at checkpoint time
    elapsed_s: float = 0.0
    phases_started: int = 0  # training phases (st3_hf/lrr.py) whose start (freeze, prune) has run
    best: Optional[Dict[str, Any]] = None  # the kept best evaluation of this phase (rewinds); weights in the checkpoint


def _recipe_hparams(recipe: Recipe) -> Dict[str, Any]:
    """Flat scalar view of the recipe for trackers (TensorBoard hparams take scalars only)."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif value is None or isinstance(value, (int, float, str, bool)):
            flat[prefix] = "none" if value is None else value
        else:
            flat[prefix] = str(value)

    walk("", dataclasses.asdict(recipe))
    return flat


def _check_frozen_zeros(sparsifier: Sparsifier) -> int:
    """Number of masked-out latent weights that are not exactly zero (must be 0 once frozen)."""
    if not sparsifier.frozen:
        return 0
    bad = 0
    for _, layer in sparsifier.named_layers():
        bad += int((layer.latent_weight.detach()[~layer.mask] != 0).sum())
    return bad


@torch.no_grad()
def _state_fingerprint(sparsifier: Sparsifier) -> torch.Tensor:
    """Per-layer (kept count, position-weighted count, weight sum) in float64: equal iff ranks agree."""
    rows = []
    for _, layer in sparsifier.named_layers():
        mask = layer.mask.reshape(-1)
        positions = torch.arange(mask.numel(), device=mask.device, dtype=torch.float64)
        rows.append(torch.stack([mask.sum().double(), (positions * mask).sum(), layer.latent_weight.detach().double().sum()]))
    return torch.cat(rows)


def _check_ranks_agree(accelerator, sparsifier: Sparsifier) -> bool:
    """All processes must end with identical masks and weights; a mismatch is a bug, not a warning."""
    if accelerator.num_processes == 1:
        return True
    local = _state_fingerprint(sparsifier).to(accelerator.device)
    everyone = accelerator.gather(local.unsqueeze(0))
    agree = bool((everyone == everyone[0:1]).all())
    if not agree:
        raise RuntimeError("processes disagree on masks or weights at the end of training")
    return agree


def _grad_norm(accelerator, model: nn.Module) -> torch.Tensor:
    """Total gradient norm (after unscaling), for the non-finite check when no clipping computes it."""
    accelerator.unscale_gradients()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO}


class _StopRequests:
    """Turns SIGTERM / SIGINT (preemption, Ctrl-C) into "checkpoint at the next step boundary, then exit"."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs one recipe end to end. ``Trainer(recipe).train()`` returns the final metrics.

    >>> from st3_hf.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml", ["training.max_steps=5"])
    >>> metrics = Trainer(recipe).train()  # doctest: +SKIP
    """

    def __init__(self, recipe: Recipe, recipe_path: Optional[str] = None):
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.output_dir = Path(recipe.output_dir)
        self.dense_start = None  # the located model.pretrained checkpoint, if any

    # ------------------------------------------------------------------ set-up
    def _build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import (
            DataLoaderConfiguration,
            DistributedDataParallelKwargs,
            InitProcessGroupKwargs,
            ProjectConfiguration,
        )

        t = self.recipe.training
        trackers = list(self.recipe.logging.trackers)
        request = requested_engine()
        refuse_before_start(request)  # ZeRO-3, FSDP: stop before any process group or engine starts
        device = accelerator_device_kwargs(request, torch.cuda.is_available())
        group_kwargs: Dict[str, Any] = {"timeout": timedelta(seconds=t.collective_timeout_s)}
        if device["backend"] is not None:
            group_kwargs["backend"] = device["backend"]
        handlers: list = [InitProcessGroupKwargs(**group_kwargs)]
        if self._probas_unused_later():
            # frozen ProbMask layers use weight * mask: the probabilities get no gradient any more,
            # which DDP's reducer otherwise takes for a bug (it waits for their gradients forever)
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        accelerator = Accelerator(
            # no GPU: `accelerate launch --multi_gpu` still gives real gloo processes on the CPU;
            # DeepSpeed without a GPU needs cpu=False and gloo (accelerate drops it when cpu=True)
            cpu=device["cpu"],
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            # same shuffle order per epoch on resume
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # the LR schedule is stepped by us once per real update
            step_scheduler_with_optimizer=False,
            # a dead rank or node makes the others fail after this long instead of waiting forever
            kwargs_handlers=handlers,
        )
        check_engine_engaged(request, accelerator)  # never a silent fallback to another engine
        if deepspeed_zero_stage(accelerator) is not None:
            ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
            if ds_cfg.get("train_micro_batch_size_per_gpu") in (None, "auto"):
                ds_cfg["train_micro_batch_size_per_gpu"] = self.recipe.data.batch_size
        return accelerator

    def _probas_unused_later(self) -> bool:
        """A ProbMask run that trains with frozen masks (LRR retrain, iterative rounds, fine-tuning)."""
        sp, t = self.recipe.sparsity, self.recipe.training
        return sp.method == "probmask" and (sp.schedule != "ramp" or t.finetune_epochs > 0)

    def _build_data(self, accelerator):
        from .data import build_dataloaders, build_device_resident_loaders

        d = self.recipe.data
        if d.device_resident:
            train_loader, eval_loader = build_device_resident_loaders(
                d,
                accelerator.device,
                self.recipe.training.seed,
                accelerator.process_index,
                accelerator.num_processes,
            )
            # each process evaluates the whole (small) eval set: identical numbers, no gather needed
            return train_loader, eval_loader, False
        train_loader, eval_loader = build_dataloaders(d, self.recipe.training.seed)
        train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
        return train_loader, eval_loader, True

    def _locate_start(self):
        """The dense pretrained checkpoint of ``model.pretrained`` (None when the run starts from scratch)."""
        m = self.recipe.model
        if m.pretrained is False:
            return None
        from .hub.dense_start import locate_dense_start

        return locate_dense_start(m.pretrained, m.name)

    def _build_model(self, steps_per_epoch: int):
        m, t = self.recipe.model, self.recipe.training
        if self.dense_start is not None:
            model = create_pretrained_model(m, self.dense_start)
            config = sparsity_config(self.recipe.sparsity, steps_per_epoch, t.epochs, t.seed)
            config = sparsity_config_for_start(config, model, m, self.dense_start)
            return model, sparsify(model, config)
        if m.init_from:
            from .run_export import from_pretrained

            model, sparsifier = from_pretrained(m.init_from, num_classes=m.num_classes, head=m.head)
            if not sparsifier.frozen:
                sparsifier.freeze()
            return model, sparsifier
        model = create_model(m)
        sparsifier = sparsify(model, sparsity_config(self.recipe.sparsity, steps_per_epoch, t.epochs, t.seed))
        return model, sparsifier

    @staticmethod
    def _start_phase(phase: Phase, sparsifier: Sparsifier) -> None:
        """Freeze and prune at the start of an LRR / iterative / fine-tuning phase (the lr rewinds by itself;
        the weights were rewound to the previous phase's best before this)."""
        if phase.freeze and not sparsifier.frozen:
            sparsifier.freeze()
        if phase.sparsity is not None:
            sparsifier.prune_frozen(phase.sparsity)

    def _probas_groups(self, sparsifier: Sparsifier, lr: float) -> list:
        """ProbMask's keep-probabilities in their own optimizer group (recipe: sparsity.probas_*)."""
        probas = sparsifier.probability_parameters()
        if not probas:
            return []
        sp = self.recipe.sparsity
        group: Dict[str, Any] = {"params": probas, "lr": lr if sp.probas_lr is None else sp.probas_lr,
                                 "weight_decay": sp.probas_weight_decay}
        if self.recipe.optimizer.name == "sgd":
            group["momentum"] = self.recipe.optimizer.momentum if sp.probas_momentum is None else sp.probas_momentum
        return [group]

    # ------------------------------------------------------------------ run
    def train(self) -> Dict[str, Any]:
        """Train, evaluate, freeze and export; SIGTERM/SIGINT checkpoint first and exit 128+signal.

        Raises :class:`~st3_hf.errors.St3Error` subclasses for problems the user can fix (bad model
        name, unusable output folder or checkpoint, a diverged run, a full disk).
        """
        with _StopRequests() as self._stops:
            try:
                return self._train()
            except OSError as err:
                if err.errno not in _DISK_ERRNOS or isinstance(err, CheckpointError):
                    raise
                last = CheckpointManager(self.output_dir / "checkpoints").latest()
                failure = OutputDirError(
                    f"writing to {err.filename or self.output_dir} failed ({err.strerror or err}); "
                    f"{f'the last complete checkpoint {last} is intact' if last else 'no checkpoint was written'}: "
                    f"free space, then continue with training.resume_from_checkpoint=latest"
                )
                failure.exit_code = 1
                raise failure from err

    def _check_output_dir(self) -> None:
        m = self.recipe.model
        try:
            num_params = count_parameters(m)
        except Exception:  # noqa: BLE001 - a model timm cannot build fails with its own error later; then only writability is proved
            num_params = 0
        estimate = SpaceEstimate.for_model(num_params, self.recipe.optimizer.name)
        warning = check_output_dir(self.output_dir, estimate, self.recipe.training.keep_checkpoints)
        if warning:
            warnings.warn(warning, stacklevel=2)

    def _load_checkpoint(self, ckpt: Path, accelerator, sparsifier: Sparsifier, steps_per_epoch: int) -> None:
        """``accelerator.load_state`` + the sparsifier, with one-line errors for a foreign or damaged checkpoint
        and for a recipe that differs from the checkpoint's (:mod:`st3_hf.resume_guard`)."""
        saved_recipe = ckpt / "recipe.yaml"
        changed = []
        if saved_recipe.is_file():
            saved = load_recipe(saved_recipe)
            # another network cannot take these weights, whatever training.allow_recipe_change says
            if (saved.model.name, saved.model.num_classes) != (self.recipe.model.name, self.recipe.model.num_classes):
                raise CheckpointError(
                    f"checkpoint {ckpt} was written for model {saved.model.name} with {saved.model.num_classes} "
                    f"classes, this recipe trains {self.recipe.model.name} with {self.recipe.model.num_classes}; "
                    f"resume with the recipe saved in {saved_recipe} or start a new output_dir"
                )
            changed = check_resume_recipe(saved, self.recipe, str(ckpt))
        try:
            accelerator.load_state(str(ckpt))
            sparsifier.load_state_dict(load_sparsifier_state(ckpt))
            if changed and not self.recipe.model.init_from:
                # allowed change: the new schedule from here on (the step count stays the checkpoint's)
                sparsifier.config = sparsity_config(self.recipe.sparsity, steps_per_epoch)
                accelerator.print(f"resuming with a changed recipe (training.allow_recipe_change): {', '.join(changed)}")
        except (RuntimeError, ValueError, KeyError, OSError, EOFError) as err:
            # weights_only refusals, shape mismatches, unreadable files: never a traceback for the user
            raise CheckpointError(
                f"checkpoint {ckpt} cannot be loaded ({describe_cause(err)}); "
                f"resume from another checkpoint or start a new output_dir"
            ) from err

    def _train(self) -> Dict[str, Any]:
        from accelerate.utils import set_seed

        if self.recipe_path:
            # the card, config.json and recipe.yaml must not call an overridden run by the file's name
            self.recipe = describe_overrides(self.recipe, load_recipe(self.recipe_path))
        recipe = self.recipe
        t = recipe.training
        if recipe.hub.push:
            # fail before hours of training, not after
            from .hub.push import check_repo_id, resolve_token

            if not recipe.hub.export:
                raise ValueError("hub.push needs hub.export: true (the pushed folder is the export)")
            check_repo_id(recipe.hub.repo_id or "")
            resolve_token()
        if recipe.model.init_from:
            check_init_from(recipe.model.init_from)
        else:
            check_model_name(recipe.model.name)
        self.dense_start = self._locate_start()
        if self.dense_start is not None:
            # the checkpoint's preprocessing is the default of data pipeline and export
            recipe = self.recipe = with_start_preprocessing(recipe, self.dense_start)
        # class folders / ClassLabel names: the count must match the head, the names go into the export
        self.label_names = check_num_classes(recipe.data, recipe.model.num_classes)
        accelerator = self._build_accelerator()
        self.accelerator = accelerator
        is_main = accelerator.is_main_process
        self._check_output_dir()  # every rank: each writes its own RNG state into the checkpoints
        set_seed(t.seed)

        train_loader, eval_loader, sharded_eval = self._build_data(accelerator)
        accum = t.gradient_accumulation_steps
        if sharded_eval:
            steps_per_epoch = math.ceil(len(train_loader) / accum)
        else:
            if len(train_loader) % accum:
                raise ValueError(
                    f"device_resident data: {len(train_loader)} batches per epoch is not a multiple of "
                    f"gradient_accumulation_steps={accum}"
                )
            steps_per_epoch = len(train_loader) // accum
        if steps_per_epoch < 1:
            raise ValueError("the training set gives no full batch: lower data.batch_size")
        sp_recipe = recipe.sparsity
        phases = training_phases(sp_recipe.schedule, t.epochs, t.finetune_epochs, sp_recipe.rounds, sp_recipe.round_fraction)
        run_epochs = total_epochs(phases)
        # a phase that restarts the lr (LRR retrain, iterative round r >= 1) first rewinds to the best
        # evaluated weights of the phase before it (the recipe check makes sure its last epoch is evaluated)
        rewinds = {i for i, phase in enumerate(phases) if i > 0 and phase.restart_lr}
        schedule_steps = t.epochs * steps_per_epoch  # one pruning run: the lr schedule's length
        total_steps = run_epochs * steps_per_epoch
        last_step = total_steps if t.max_steps is None else min(total_steps, t.max_steps)

        set_seed(t.seed)  # same initial weights on every process, whatever the data set-up drew
        model, sparsifier = self._build_model(steps_per_epoch)
        self.sparsifier = sparsifier
        raw_model = model
        if recipe.model.channels_last:
            model = model.to(memory_format=torch.channels_last)

        lr = resolve_lr(recipe, accelerator.num_processes)
        optimizer = build_optimizer(model, recipe.optimizer, lr, self._probas_groups(sparsifier, lr))
        deepspeed = deepspeed_zero_stage(accelerator) is not None
        if deepspeed and rewinds:
            # loading weights into the module would not reach the engine's fp32 masters: a silent no-op rewind
            raise EngineError(f"sparsity.schedule {sp_recipe.schedule} (best-weights rewind) does not run under DeepSpeed; "
                              f"use DDP (accelerate launch --multi_gpu)")
        if not deepspeed:
            optimizer = sparsifier.wrap(optimizer)
        scheduler = build_lr_scheduler(optimizer, recipe.lr_schedule, steps_per_epoch, schedule_steps, lr, phases)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if recipe.model.compile:
            model = torch.compile(model)
        ds_sparsity = None
        if deepspeed:
            from .deepspeed_support import DeepSpeedSparsity

            # thresholds and masks from the fp32 masters; inputs cast to the engine's dtype
            ds_sparsity = DeepSpeedSparsity(sparsifier, model)
            ds_sparsity.refresh()
        else:
            sparsifier.refresh()  # prepare() may have moved or converted the weights

        jsonl = JsonlLogger(self.output_dir / METRICS_FILE, enabled=is_main)
        manager = CheckpointManager(self.output_dir / "checkpoints", keep=t.keep_checkpoints)
        state = TrainState()
        best = BestWeights()  # the best evaluated weights of the current phase, when a rewind follows it
        resumed = False
        if t.resume_from_checkpoint:
            ckpt = manager.resolve(t.resume_from_checkpoint)
            if ckpt is None:
                accelerator.print(f"resume_from_checkpoint=latest: no checkpoint in {manager.folder}, starting fresh")
            else:
                self._load_checkpoint(ckpt, accelerator, sparsifier, steps_per_epoch)
                resumed = True
                if ds_sparsity is not None:
                    ds_sparsity.load_state()
                state = TrainState(**read_trainer_state(ckpt))
                best.load(ckpt, state.best)
                jsonl.truncate(state.log_records)
                accelerator.print(f"resumed from {ckpt} at step {state.global_step}")
        elif is_main and jsonl.path.exists():
            jsonl.path.unlink()  # a fresh run starts a fresh metrics file
        if is_main:  # only now: a start that failed leaves no recipe.yaml claiming a run
            save_recipe(recipe, self.output_dir / "recipe.yaml")

        accelerator.init_trackers(recipe.logging.project_name, config=_recipe_hparams(recipe))
        loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        input_size = list(recipe.data.input_size)

        def log(record: Dict[str, Any]) -> None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            accelerator.log(scalars, step=record["step"])
            jsonl.log(record)

        def checkpoint() -> Path:
            def write(folder: Path) -> None:
                accelerator.save_state(str(folder))
                if accelerator.is_main_process:
                    save_sparsifier_state(sparsifier.state_dict(), folder)
                    save_recipe(recipe, folder / "recipe.yaml")
                    best.save(folder)  # inside the temporary folder: published with the checkpoint

            state.log_records = jsonl.count()
            state.best = best.meta
            state.elapsed_s = elapsed()
            return manager.save(
                state.global_step, write, dataclasses.asdict(state), accelerator.is_main_process, accelerator.wait_for_everyone
            )

        def run_eval(tag: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
            scores = evaluate_model(
                model,
                eval_loader,
                accelerator,
                gather=sharded_eval,
                max_batches=recipe.evaluation.max_batches,
                show_progress=recipe.logging.progress_bar,
            )
            macs = count_macs(raw_model, input_size)
            violations = _check_frozen_zeros(sparsifier)
            if violations:
                raise RuntimeError(f"{violations} masked weights of a frozen model are non-zero")
            record = {
                "kind": tag,
                "step": state.global_step,
                "epoch": state.epoch,
                "eval_top1": scores["top1"],
                "eval_top5": scores["top5"],
                "eval_loss": scores["loss"],
                "eval_examples": scores["num_examples"],
                "eval_skipped_images": scores["skipped_examples"],
                "sparsity": sparsifier.sparsity(),  # over the prunable weights
                "sparsity_all_params": sparsifier.sparsity_of_all_parameters(),  # over every model parameter
                "target_ratio": sparsifier.ratio,
                "dense_mflops": macs.dense_mflops,
                "sparse_mflops": macs.sparse_mflops,
                "frozen": sparsifier.frozen,
                "layer_sparsity": sparsifier.layer_sparsity(),
                "elapsed_s": elapsed(),
                **(extra or {}),
            }
            log(record)
            accelerator.print(
                f"[{tag}] step {state.global_step} epoch {state.epoch}: top1 {scores['top1']:.4f} "
                f"top5 {scores['top5']:.4f} loss {scores['loss']:.4f} sparsity {record['sparsity']:.4f} "
                f"MFLOPs {macs.sparse_mflops:.1f}/{macs.dense_mflops:.1f}"
            )
            return record

        start_time = time.time() - state.elapsed_s

        def elapsed() -> float:
            return time.time() - start_time

        bar = make_progress(last_step, state.global_step, enabled=is_main and recipe.logging.progress_bar,
                            every=t.log_every_steps)
        stops = self._stops

        def stop_requested(at_sync_point: bool) -> bool:
            """Single process: at once. Several: agreed on at logging steps (one collective there)."""
            if accelerator.num_processes == 1:
                return stops.signum is not None
            if not at_sync_point:
                return False
            flag = torch.tensor([1.0 if stops.signum is not None else 0.0], device=accelerator.device)
            return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

        guard = None
        if t.max_consecutive_nonfinite_steps is not None:
            reduce_flags = None
            if accelerator.num_processes > 1:
                reduce_flags = lambda flag: accelerator.reduce(flag, reduction="sum")  # noqa: E731
            guard = NonFiniteGuard(model, t.max_consecutive_nonfinite_steps, reduce_flags)
        # fp16: overflowing gradients are the loss scaler's business (it skips those steps itself)
        check_grads = t.mixed_precision != "fp16"
        running_loss = torch.zeros((), device=accelerator.device)
        running_count = 0
        skipped_images = torch.zeros((), dtype=torch.long, device=accelerator.device)  # unreadable files met
        window_loss = torch.zeros((), device=accelerator.device)  # summed over one accumulation window
        window_batches = 0
        stop = state.global_step >= last_step
        if self.dense_start is not None and not resumed and recipe.evaluation.at_start:
            run_eval("start", {"base_model": self.dense_start.name})  # what sparsity will cost, measured from here
        model.train()
        while not stop and state.epoch < run_epochs:
            epoch = state.epoch
            phase_index, phase = phase_at(phases, epoch)
            if phase_index >= state.phases_started:
                rewound: Dict[str, Any] = {}
                if phase_index in rewinds:
                    source = best.for_phase(phase_index - 1)
                    if source is None:
                        raise RuntimeError(f"phase {phase_index} rewinds, but phase {phase_index - 1} kept no best weights")
                    digest = best.restore(raw_model, sparsifier)  # optimizer state (momentum) is kept
                    rewound = {"rewound_to": {**source, "weights_sha256": digest}}
                    best.clear()
                self._start_phase(phase, sparsifier)
                state.phases_started = phase_index + 1
                if len(phases) > 1:
                    log({"kind": "phase", "step": state.global_step, "epoch": epoch, "phase": phase.name,
                         "phase_index": phase_index, "frozen": sparsifier.frozen,
                         "sparsity": sparsifier.sparsity(), **rewound, "elapsed_s": elapsed()})
            loader = train_loader
            if state.batches_in_epoch:
                if sharded_eval:
                    loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            for epoch_aware in (loader, getattr(train_loader, "dataset", None)):
                if hasattr(epoch_aware, "set_epoch"):
                    epoch_aware.set_epoch(epoch)  # shuffle order and augmentation seeds of this epoch
            if state.batches_in_epoch and not sharded_eval:
                loader = itertools.islice(iter(train_loader), state.batches_in_epoch, None)
            for images, labels in loader:
                update_ok = True
                with accelerator.accumulate(model):
                    logits = model(images)
                    loss = loss_fn(logits, labels)
                    accelerator.backward(loss)
                    window_loss += loss.detach().float()
                    skipped_images += (labels == UNREADABLE_LABEL).sum()
                    window_batches += 1
                    if accelerator.sync_gradients and not deepspeed:
                        grad_norm = None
                        if t.grad_clip:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                        elif guard is not None and check_grads:
                            grad_norm = _grad_norm(accelerator, model)
                        if guard is not None:
                            update_ok = guard.update_is_finite(window_loss, grad_norm if check_grads else None)
                    if update_ok:
                        optimizer.step()  # a no-op on accumulation micro-steps
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                if deepspeed and guard is not None:
                    # the engine already stepped inside backward: count the bad update, it cannot be undone
                    update_ok = guard.update_is_finite(window_loss, None)
                if update_ok:
                    running_loss += window_loss
                    running_count += window_batches
                window_loss.zero_()
                window_batches = 0
                skipped = accelerator.optimizer_step_was_skipped or not update_ok
                if deepspeed:
                    engine = model
                    applied = getattr(engine, "was_step_applied", lambda: True)()
                    if applied:
                        ds_sparsity.step()
                    skipped = not applied
                if not skipped:
                    scheduler.step()
                state.global_step += 1
                if guard is not None:
                    if update_ok:
                        guard.commit()
                    else:
                        guard.reject(state.global_step)
                        if is_main:
                            print(
                                f"warning: step {state.global_step}: non-finite loss or gradient, update skipped "
                                f"({guard.consecutive} in a row; the run stops after {guard.max_consecutive})",
                                file=sys.stderr,
                            )
                        log({"kind": "skipped_update", "step": state.global_step, "epoch": epoch,
                             "consecutive": guard.consecutive, "elapsed_s": elapsed()})
                        if guard.exhausted:
                            saved = checkpoint()
                            accelerator.end_training()
                            raise guard.diverged_error(str(saved))
                if state.global_step % t.log_every_steps == 0 or state.global_step == last_step:
                    mean_loss = float(running_loss) / max(running_count, 1)
                    skipped_total = skipped_images if accelerator.num_processes == 1 else \
                        accelerator.reduce(skipped_images.clone(), reduction="sum")
                    log(
                        {
                            "kind": "train",
                            "step": state.global_step,
                            "epoch": epoch,
                            "train_loss": mean_loss,
                            "lr": float(scheduler.get_last_lr()[0]),
                            "target_ratio": sparsifier.ratio,
                            "sparsifier_step": sparsifier.step_count,
                            "train_skipped_images": int(skipped_total),
                            **({"engine_steps": int(model.global_steps)} if deepspeed else {}),
                            "elapsed_s": elapsed(),
                        }
                    )
                    bar.set_postfix(loss=f"{mean_loss:.3f}", ratio=f"{sparsifier.ratio:.3f}")
                    skipped_images.zero_()
                    running_loss.zero_()
                    running_count = 0
                bar.update(1)  # after the postfix: a log line shows this step's loss
                if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0:
                    checkpoint()
                if stop_requested(state.global_step % t.log_every_steps == 0):
                    checkpoint()
                    accelerator.print(
                        f"stopped by signal {stops.signum} at step {state.global_step}: checkpoint saved in "
                        f"{manager.latest()}; continue with training.resume_from_checkpoint=latest"
                    )
                    accelerator.end_training()
                    raise SystemExit(128 + int(stops.signum or signal.SIGTERM))
                if state.global_step >= last_step:
                    stop = True
                    break
            epoch_done = not stop or state.batches_in_epoch >= len(train_loader)
            if epoch_done:
                if (epoch + 1) % recipe.evaluation.every_epochs == 0 and not (
                    epoch + 1 == run_epochs and recipe.evaluation.at_end and t.freeze_at_end
                ):
                    record = run_eval("eval")
                    # rewind candidates: evaluations once the mask budget is complete (frozen, or the ramp
                    # at its target), so the rewound weights freeze to the requested sparsity
                    at_target = sparsifier.frozen or sparsifier.ratio >= sparsifier.config.target - 1e-9
                    if phase_index + 1 in rewinds and at_target:
                        best.offer(record["eval_top1"], raw_model, sparsifier,
                                   {"step": state.global_step, "epoch": epoch, "phase_index": phase_index})
                state.epoch += 1
                state.batches_in_epoch = 0
                if t.checkpoint_every_epoch:
                    checkpoint()
        bar.close()

        final: Dict[str, Any] = {}
        if t.freeze_at_end:
            if ds_sparsity is not None:
                ds_sparsity.freeze()
            else:
                sparsifier.freeze()
        ranks_agree = _check_ranks_agree(accelerator, sparsifier)
        if recipe.evaluation.at_end:
            final = run_eval("final", {"num_processes": accelerator.num_processes, "ranks_agree": ranks_agree})
        accelerator.wait_for_everyone()
        if ds_sparsity is not None:
            ds_sparsity.full_precision_model(raw_model)  # export the fp32 masters (a collective)
        if is_main and recipe.hub.export:
            self._export(raw_model, sparsifier, final)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return final

    def _export(self, model: nn.Module, sparsifier: Sparsifier, final: Dict[str, Any]) -> Path:
        from .data import pretrained_cfg_for
        from .run_export import export_run

        hub = self.recipe.hub
        metrics: Dict[str, Any] = {}  # no final evaluation: the card says "not evaluated" (not an earlier epoch's)
        if final:
            metrics = {"top1": final["eval_top1"], "top5": final["eval_top5"], "loss": final["eval_loss"]}
        data_cfg = pretrained_cfg_for(self.recipe.data)
        start_kwargs: Dict[str, Any] = {}
        if self.dense_start is not None:
            from .hub.dense_start import label_names

            names = label_names(self.dense_start, int(self.recipe.model.num_classes))
            if names:
                data_cfg["label_names"] = names  # the inherited head keeps its classes
            start_kwargs["start_checkpoint"] = self.dense_start.name
            if not hub.base_model and self.dense_start.repo_id:
                start_kwargs["base_model"] = self.dense_start.repo_id
        folder = export_run(
            model,
            sparsifier,
            self.output_dir,
            self.recipe,
            data_pretrained_cfg=data_cfg,
            metrics=metrics,  # paper figures and base model come from the recipe inside export_pretrained
            # copied into the export: a folder of export files only is replaced whole, metrics.jsonl included
            metrics_file=self.output_dir / METRICS_FILE if (self.output_dir / METRICS_FILE).is_file() else None,
            label_names=self.label_names or None,
            **start_kwargs,
        )
        if hub.push:
            from .hub.push import push_folder

            url = push_folder(folder, hub.repo_id, private=hub.private, revision=hub.revision)
            self.accelerator.print(f"pushed to {url}")
        return folder
