"""The training loop: a recipe in, a trained, frozen, exported sparse model out.

Read :meth:`Trainer.train` top to bottom: set-up (inputs, accelerator, data, model, optimizer,
resume), then epochs of :meth:`Trainer._train_step` (accumulate / backward / step as in accelerate's
``complete_cv_example``), evaluation, checkpoints (``accelerator.save_state``) and the export. What
differs between one process / DDP, DeepSpeed and FSDP2 is one :class:`~st3_hf.train.engines.Engine`
(``self.engine``); the :class:`~st3_hf.Sparsifier` advances once per real optimizer update, in
``engine.update`` (the wrapped optimizer's post-step hook, or the fp32 masters under DeepSpeed).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from st3_hf.train.checkpointing import DISK_ERRNOS, TRAINER_STATE, CheckpointManager, TrainState
from st3_hf.train.data.sources import UNREADABLE_LABEL, check_num_classes
from st3_hf.train.engines import accelerator_device_kwargs, build_engine, check_engine_engaged, requested_engine
from st3_hf.errors import EngineError, ModelError, RunError, describe_cause
from st3_hf.hub.export import METRICS_FILENAME
from st3_hf.train.evaluation import evaluate_model, model_figures
from st3_hf.sparse.layers import local_tensor
from st3_hf.sparse.methods.base import METHODS
from st3_hf.train.init_source import check_init_from
from st3_hf.train.lrr import BestWeights, phase_at, training_phases
from st3_hf.train.metrics_log import JsonlLogger, make_progress
from st3_hf.train.modeling import (check_model_name, count_parameters, create_model, create_pretrained_model,
                                   sparsity_config_for_start, with_start_preprocessing)
from st3_hf.train.nonfinite import NonFiniteGuard
from st3_hf.train.optim import build_lr_scheduler, build_optimizer
from st3_hf.train.recipe import load_recipe, resolve_lr, save_recipe
from st3_hf.train.recipe_schema import Recipe, sparsity_config
from st3_hf.train.resume_guard import check_resume_recipe, flatten
from st3_hf.train.run_folder import SpaceEstimate, check_output_dir, claim_run_folder
from st3_hf.train.run_export import save_checkpoint_config
from st3_hf.sparse.sparsifier import Sparsifier, sparsify


class StopRequests:
    """SIGTERM / SIGINT (preemption, Ctrl-C) become "checkpoint at the next step boundary, then exit 128+signal".

    One process stops at once; several agree at logging steps (one collective there), so all stop together.
    """

    # Ctrl-C reaches the whole process group: the launcher (accelerate launch, torchrun) gets it too and passes
    # a stop of its own on within milliseconds; only a signal after this long means "stop now, no checkpoint"
    REPEAT_AFTER_S = 2.0

    def __enter__(self) -> "StopRequests":
        self.signum: Optional[int] = None
        self.first_at, self._previous = 0.0, {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
        elif time.monotonic() - self.first_at > self.REPEAT_AFTER_S:  # asked again: stop now
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator, at_sync_point: bool) -> bool:
        if accelerator.num_processes == 1:
            return self.signum is not None
        if not at_sync_point:
            return False
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Trainer:
    """Runs one recipe end to end. ``Trainer(recipe).train()`` returns the final metrics.

    >>> from st3_hf.train.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml", ["training.max_steps=5"])
    >>> metrics = Trainer(recipe).train()  # doctest: +SKIP
    """

    def __init__(self, recipe: Recipe):
        self.recipe, self.output_dir = recipe, Path(recipe.output_dir)
        self.dense_start = None  # the located model.pretrained checkpoint, if any
        self.run_lock: Optional[int] = None  # the output folder's lock, held by the main process for the run's life

    def train(self) -> Dict[str, Any]:
        """Train, evaluate, freeze and export; SIGTERM/SIGINT checkpoint first and exit 128+signal. Problems the user
        can fix (model name, output folder, checkpoint, a diverged run, a full disk) raise :class:`~st3_hf.errors.St3Error`."""
        with StopRequests() as self.stops:
            try:
                self._check_inputs()
                self._set_up()
                self._resume_or_start()
                self._fit()
                return self._finish()
            except OSError as err:
                if err.errno not in DISK_ERRNOS:
                    raise
                last = CheckpointManager(self.output_dir / "checkpoints").latest()
                raise RunError(f"writing to {err.filename or self.output_dir} failed ({err.strerror or err}); "
                               f"{f'the last complete checkpoint {last} is intact' if last else 'no checkpoint was written'}"
                               f": free space, then continue with training.resume_from_checkpoint=latest") from err
            finally:
                if self.run_lock is not None:
                    os.close(self.run_lock)  # releases the flock

    # ------------------------------------------------------------------ set-up
    def _check_inputs(self) -> None:
        """Everything a user can get wrong, before any process group, data or model exists."""
        recipe = self.recipe
        if recipe.hub.push:  # fail before hours of training, not after
            from st3_hf.hub.push import check_repo_id, resolve_token
            if not recipe.hub.export:
                raise ValueError("hub.push needs hub.export: true (the pushed folder is the export)")
            check_repo_id(recipe.hub.repo_id or "")
            resolve_token()
        if recipe.model.init_from:
            check_init_from(recipe.model.init_from)
        else:
            check_model_name(recipe.model.name)
        if recipe.model.pretrained is not False:
            from st3_hf.hub.dense_start import locate_dense_start
            self.dense_start = locate_dense_start(recipe.model.pretrained, recipe.model.name)
            # the checkpoint's preprocessing is the default of data pipeline and export
            self.recipe = with_start_preprocessing(recipe, self.dense_start)
        # class folders / ClassLabel names: the count must match the head, the names go into the export
        self.label_names = check_num_classes(self.recipe.data, self.recipe.model.num_classes)

    def _set_up(self) -> None:
        from accelerate.utils import set_seed
        recipe, t = self.recipe, self.recipe.training
        self.accelerator = accelerator = self._build_accelerator()
        try:  # the folder is checked on every rank: each writes its own RNG state into the checkpoints
            num_params = count_parameters(recipe.model)
        except Exception:  # noqa: BLE001 - a model timm cannot build fails with its own error later; then only writability is proved
            num_params = 0
        warning = check_output_dir(self.output_dir, SpaceEstimate.for_model(num_params, recipe.optimizer.name),
                                   t.keep_checkpoints)
        if warning:
            warnings.warn(warning, stacklevel=2)
        accelerator.wait_for_everyone()  # no rank's space probe is left when the main process looks into the folder
        if accelerator.is_main_process:  # before anything is written: the folder is this run's, or nothing starts
            self.run_lock = claim_run_folder(self.output_dir, resuming=bool(t.resume_from_checkpoint),
                                             overwrite=t.overwrite_output_dir)
        accelerator.wait_for_everyone()
        set_seed(t.seed)
        self._build_data()
        sp = recipe.sparsity
        self.phases = training_phases(sp.schedule, t.epochs, t.finetune_epochs, sp.rounds, sp.round_fraction)
        self.run_epochs = self.phases[-1].end_epoch
        # a phase that restarts the lr (LRR retrain, iterative round r >= 1) first rewinds to the best
        # evaluated weights of the phase before it (the recipe check makes sure its last epoch is evaluated)
        self.rewinds = {i for i, phase in enumerate(self.phases) if i > 0 and phase.restart_lr}
        total_steps = self.run_epochs * self.steps_per_epoch
        self.last_step = total_steps if t.max_steps is None else min(total_steps, t.max_steps)

        set_seed(t.seed)  # same initial weights on every process, whatever the data set-up drew
        self.raw_model, self.sparsifier = self._build_model()
        model = self.raw_model.to(memory_format=torch.channels_last) if recipe.model.channels_last else self.raw_model
        if self.rewinds and not self.engine.rewinds_weights:
            raise EngineError(f"sparsity.schedule {sp.schedule} (best-weights rewind) does not run under "
                              f"{self.engine.title}; use DDP (accelerate launch --multi_gpu)")
        lr = resolve_lr(recipe, accelerator.num_processes)
        self.model, self.optimizer, self.scheduler = self.engine.prepare(
            accelerator, model, self.sparsifier,
            lambda module: build_optimizer(module, recipe.optimizer, lr, self._probas_groups(lr)),
            lambda optimizer: build_lr_scheduler(optimizer, recipe.lr_schedule, self.steps_per_epoch,
                                                 t.epochs * self.steps_per_epoch, lr, self.phases))
        if recipe.model.compile:
            self.model = torch.compile(self.model)
        self.engine.sparsity.refresh()  # prepare() may have moved or converted the weights

        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.jsonl = JsonlLogger(self.output_dir / METRICS_FILENAME, enabled=accelerator.is_main_process)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep=t.keep_checkpoints)
        self.state = TrainState()
        self.best = BestWeights()  # the best evaluated weights of the current phase, when a rewind follows it
        self.guard = None if t.max_consecutive_nonfinite_steps is None else NonFiniteGuard(
            self.model, t.max_consecutive_nonfinite_steps, lambda flag: accelerator.reduce(flag, reduction="sum"))
        zero = lambda **kw: torch.zeros((), device=accelerator.device, **kw)  # noqa: E731
        self.window_loss, self.window_batches = zero(), 0  # summed over one accumulation window
        self.running_loss, self.running_count = zero(), 0  # summed over the applied updates since the last log
        self.skipped_images = zero(dtype=torch.long)  # unreadable files met since the last log

    def _build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                                      ProjectConfiguration, patch_environment)
        recipe, t, sp = self.recipe, self.recipe.training, self.recipe.sparsity
        request = requested_engine()
        self.engine = build_engine(request, recipe)  # what it cannot train stops before any process group starts
        device = accelerator_device_kwargs(request, torch.cuda.is_available())
        # a dead rank or node makes the others fail after this long instead of waiting forever
        backend = {"backend": device["backend"]} if device["backend"] is not None else {}
        handlers: list = [InitProcessGroupKwargs(timeout=timedelta(seconds=t.collective_timeout_s), **backend)]
        if METHODS[sp.method].frozen_leaves_parameters_unused and (sp.schedule != "ramp" or t.finetune_epochs > 0):
            # DDP's reducer otherwise waits forever for gradients that never come
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        # no GPU: `accelerate launch --multi_gpu` still gives real gloo processes on the CPU; DeepSpeed without a GPU
        # needs cpu=False and gloo (accelerate drops it when cpu=True). The seedable sampler: the same shuffle order
        # on resume; the LR schedule is stepped by us, once per real update
        with patch_environment(**self.engine.accelerate_env):
            accelerator = Accelerator(
                cpu=device["cpu"], mixed_precision=t.mixed_precision, log_with=list(recipe.logging.trackers) or None,
                gradient_accumulation_steps=t.gradient_accumulation_steps, kwargs_handlers=handlers,
                project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), step_scheduler_with_optimizer=False)
        check_engine_engaged(request, accelerator)  # never a silent fallback to another engine
        self.engine.configure(accelerator, recipe)
        return accelerator

    def _build_data(self) -> None:
        from st3_hf.train.data import build_dataloaders, build_device_resident_loaders
        d, accelerator, t = self.recipe.data, self.accelerator, self.recipe.training
        accum = t.gradient_accumulation_steps
        # device-resident data: each process evaluates the whole (small) eval set, identical numbers, no gather
        self.data_split_over_processes = not d.device_resident
        if d.device_resident:
            self.train_loader, self.eval_loader = build_device_resident_loaders(
                d, accelerator.device, t.seed, accelerator.process_index, accelerator.num_processes)
            if len(self.train_loader) % accum:
                raise ValueError(f"device_resident data: {len(self.train_loader)} batches per epoch is not a multiple "
                                 f"of gradient_accumulation_steps={accum}")
        else:
            self.train_loader, self.eval_loader = accelerator.prepare(*build_dataloaders(d, t.seed))
        self.steps_per_epoch = math.ceil(len(self.train_loader) / accum)
        if self.steps_per_epoch < 1:
            raise ValueError("the training set gives no full batch: lower data.batch_size")

    def _build_model(self):
        m, t = self.recipe.model, self.recipe.training
        if m.init_from:  # a sparse export, fine-tuned with its masks frozen
            from st3_hf.hub import from_pretrained
            model, sparsifier = from_pretrained(m.init_from, num_classes=m.num_classes, head=m.head)
            if not sparsifier.frozen:
                sparsifier.freeze()
            return model, sparsifier
        config = sparsity_config(self.recipe.sparsity, self.steps_per_epoch, t.epochs, t.seed)
        if self.dense_start is None:
            return (model := create_model(m)), sparsify(model, config)
        model = create_pretrained_model(m, self.dense_start)
        return model, sparsify(model, sparsity_config_for_start(config, model, m, self.dense_start))

    def _probas_groups(self, lr: float) -> list:
        """ProbMask's keep-probabilities in their own optimizer group (recipe: sparsity.probas_*)."""
        sp, opt, probas = self.recipe.sparsity, self.recipe.optimizer, self.sparsifier.method_parameters()
        group = {"params": probas, "lr": lr if sp.probas_lr is None else sp.probas_lr, "weight_decay": sp.probas_weight_decay}
        if opt.name == "sgd":
            group["momentum"] = opt.momentum if sp.probas_momentum is None else sp.probas_momentum
        return [group] if probas else []

    # ------------------------------------------------------------------ resume
    def _resume_or_start(self) -> None:
        """Resume (``accelerator.load_state`` + the engine's sparsity state) with one-line errors for a foreign or
        damaged checkpoint and for a recipe that differs from the checkpoint's (:mod:`~st3_hf.train.resume_guard`),
        or start fresh."""
        recipe, t, is_main = self.recipe, self.recipe.training, self.accelerator.is_main_process
        ckpt = self.checkpoints.resolve(t.resume_from_checkpoint) if t.resume_from_checkpoint else None
        self.resumed = ckpt is not None
        if t.resume_from_checkpoint and ckpt is None:
            self.accelerator.print(f"resume_from_checkpoint=latest: no checkpoint in {self.checkpoints.folder}, starting fresh")
        if ckpt is not None:
            saved = ckpt / "recipe.yaml"
            changed = check_resume_recipe(load_recipe(saved), recipe, str(ckpt)) if saved.is_file() else []
            try:
                self.accelerator.load_state(str(ckpt))
                self.engine.load(ckpt)
                if changed and not recipe.model.init_from:
                    # allowed change: the new schedule from here on (the step count stays the checkpoint's)
                    self.sparsifier.config = sparsity_config(recipe.sparsity, self.steps_per_epoch)
                    self.accelerator.print(f"resuming with a changed recipe (training.allow_recipe_change): "
                                           f"{', '.join(changed)}")
            except (RuntimeError, ValueError, KeyError, OSError, EOFError) as err:
                # weights_only refusals, shape mismatches, unreadable files: never a traceback for the user
                raise ModelError(f"checkpoint {ckpt} cannot be loaded ({describe_cause(err)}); resume from another "
                                 f"checkpoint or start a new output_dir") from err
            self.engine.sparsity.refresh()  # effective weights from the loaded (master) weights
            self.state = TrainState(**json.loads((ckpt / TRAINER_STATE).read_text()))  # checked by resolve()
            self.running_loss.fill_(self.state.train_loss_sum)
            self.running_count = self.state.train_loss_count
            self.skipped_images.fill_(self.state.skipped_images if is_main else 0)
            self.best.load(ckpt, self.state.best)
            self.jsonl.truncate(self.state.log_records)
            self.accelerator.print(f"resumed from {ckpt} at step {self.state.global_step}")
        elif is_main and self.jsonl.path.exists():
            self.jsonl.path.unlink()  # a fresh run starts a fresh metrics file
        if is_main:  # only now: a start that failed leaves no recipe.yaml claiming a run
            save_recipe(recipe, self.output_dir / "recipe.yaml")
        # trackers get a flat scalar view of the recipe (TensorBoard hparams take scalars only)
        hparams = {key: "none" if value is None else value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in flatten(dataclasses.asdict(recipe)).items()}
        self.accelerator.init_trackers(recipe.logging.project_name, config=hparams)
        self.start_time = time.time() - self.state.elapsed_s

    # ------------------------------------------------------------------ the loop
    def _fit(self) -> None:
        state, recipe = self.state, self.recipe
        self.bar = make_progress(self.last_step, state.global_step, every=recipe.training.log_every_steps,
                                 enabled=self.accelerator.is_main_process and recipe.logging.progress_bar)
        if self.dense_start is not None and not self.resumed and recipe.evaluation.at_start:
            self._evaluate("start", base_model=self.dense_start.name)  # what sparsity will cost, measured from here
        self.model.train()
        while state.global_step < self.last_step and state.epoch < self.run_epochs:
            phase_index = self._enter_phase()
            if self._run_epoch():
                self._end_epoch(phase_index)
        self.bar.close()

    def _enter_phase(self) -> int:
        """At the first epoch of an LRR / iterative / fine-tuning phase: rewind to the previous phase's best
        weights (optimizer momentum is kept), then freeze and prune as the phase asks (the lr rewinds by itself)."""
        state, sparsifier = self.state, self.sparsifier
        phase_index, phase = phase_at(self.phases, state.epoch)
        if phase_index < state.phases_started:
            return phase_index
        rewound: Dict[str, Any] = {}
        if phase_index in self.rewinds:
            source = self.best.for_phase(phase_index - 1)
            if source is None:
                raise RuntimeError(f"phase {phase_index} rewinds, but phase {phase_index - 1} kept no best weights")
            rewound = {"rewound_to": {**source, "weights_sha256": self.best.restore(self.raw_model, sparsifier)}}
            self.best.clear()
        if phase.freeze and not sparsifier.frozen:
            sparsifier.freeze()
        if phase.sparsity is not None:
            sparsifier.prune_frozen(phase.sparsity)
        state.phases_started = phase_index + 1
        if len(self.phases) > 1:
            self._log("phase", phase=phase.name, phase_index=phase_index, frozen=sparsifier.frozen,
                      sparsity=sparsifier.sparsity(), **rewound)
        return phase_index

    def _run_epoch(self) -> bool:
        """Train the rest of the current epoch (the batches a resumed checkpoint already consumed skipped: same
        order, same augmentations); False when ``last_step`` cut it short."""
        state, loader = self.state, self.train_loader
        if state.batches_in_epoch and self.data_split_over_processes:
            loader = self.accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
        for epoch_aware in (loader, getattr(self.train_loader, "dataset", None)):
            if hasattr(epoch_aware, "set_epoch"):
                epoch_aware.set_epoch(state.epoch)  # shuffle order and augmentation seeds of this epoch
        if state.batches_in_epoch and not self.data_split_over_processes:
            loader = itertools.islice(iter(self.train_loader), state.batches_in_epoch, None)
        for images, labels in loader:
            finite = self._train_step(images, labels)
            state.batches_in_epoch += 1
            if finite is None:  # an accumulation micro-step
                continue
            self._after_update(finite)
            if state.global_step >= self.last_step:
                return state.batches_in_epoch >= len(self.train_loader)
        return True

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Optional[bool]:
        """One micro-batch: forward, backward and, at a gradient-sync step, the engine's optimizer update (which
        advances the sparsity). None on a micro-step, else whether the window's loss and gradient were finite."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            loss = self.loss_fn(self.model(images), labels)
            accelerator.backward(loss)  # DeepSpeed: the engine updates in here at gradient-sync steps
            self.window_loss += loss.detach().float()
            self.window_batches += 1
            self.skipped_images += (labels == UNREADABLE_LABEL).sum()
            if not accelerator.sync_gradients:
                return None
            finite = self.engine.update(self.guard, self.window_loss)  # also steps the LR schedule
            # (accelerate's wrapped optimizer ignores zero_grad between; the FSDP2 path's optimizer is not wrapped)
            self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _after_update(self, finite: bool) -> None:
        """Bookkeeping of one optimizer step: the non-finite guard, the train log, checkpoints, stop signals."""
        state, t, guard = self.state, self.recipe.training, self.guard
        if finite:
            self.running_loss += self.window_loss
            self.running_count += self.window_batches
        self.window_loss.zero_()
        self.window_batches, state.global_step = 0, state.global_step + 1
        if guard is not None and finite:
            guard.commit()
        elif guard is not None:
            guard.reject(state.global_step)
            if self.accelerator.is_main_process:
                print(f"warning: step {state.global_step}: non-finite loss or gradient, update skipped "
                      f"({guard.consecutive} in a row; the run stops after {guard.max_consecutive})", file=sys.stderr)
            self._log("skipped_update", consecutive=guard.consecutive)
            if guard.exhausted:
                saved = self._checkpoint()
                self.accelerator.end_training()
                raise guard.diverged_error(str(saved))
        if state.global_step % t.log_every_steps == 0 or state.global_step == self.last_step:
            self._log_train()
        self.bar.update(1)  # after the postfix: a log line shows this step's loss
        if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0:
            self._checkpoint()
        if self.stops.agreed(self.accelerator, state.global_step % t.log_every_steps == 0):
            self._checkpoint()
            self.accelerator.print(f"stopped by signal {self.stops.signum} at step {state.global_step}: checkpoint saved "
                                   f"in {self.checkpoints.latest()}; continue with training.resume_from_checkpoint=latest")
            self.accelerator.end_training()
            raise SystemExit(128 + int(self.stops.signum or signal.SIGTERM))

    def _log_train(self) -> None:
        sparsifier, mean_loss = self.sparsifier, float(self.running_loss) / max(self.running_count, 1)
        self._log("train", train_loss=mean_loss, lr=float(self.scheduler.get_last_lr()[0]),
                  target_ratio=sparsifier.ratio, sparsifier_step=sparsifier.step_count,
                  train_skipped_images=int(self.accelerator.reduce(self.skipped_images, reduction="sum")),
                  **self.engine.log_fields())
        self.bar.set_postfix(loss=f"{mean_loss:.3f}", ratio=f"{sparsifier.ratio:.3f}")
        self.skipped_images.zero_()
        self.running_loss.zero_()
        self.running_count = 0

    def _end_epoch(self, phase_index: int) -> None:
        state, recipe, sparsifier, epoch = self.state, self.recipe, self.sparsifier, self.state.epoch
        final_eval_follows = epoch + 1 == self.run_epochs and recipe.evaluation.at_end and recipe.training.freeze_at_end
        if (epoch + 1) % recipe.evaluation.every_epochs == 0 and not final_eval_follows:
            record = self._evaluate("eval")
            # rewind candidates: evaluations once the masks are complete (frozen, or the ramp at its target), so
            # the rewound weights freeze to the requested sparsity
            at_target = sparsifier.frozen or sparsifier.ratio >= sparsifier.config.target - 1e-9
            if phase_index + 1 in self.rewinds and at_target:
                self.best.offer(record["eval_top1"], self.raw_model, sparsifier,
                                {"step": state.global_step, "epoch": epoch, "phase_index": phase_index})
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if recipe.training.checkpoint_every_epoch:
            self._checkpoint()

    # ------------------------------------------------------------------ evaluate, checkpoint, log
    def _evaluate(self, tag: str, **extra: Any) -> Dict[str, Any]:
        recipe, sparsifier = self.recipe, self.sparsifier
        self.engine.sync_buffers()
        scores = evaluate_model(self.model, self.eval_loader, self.accelerator, gather=self.data_split_over_processes,
                                max_batches=recipe.evaluation.max_batches, show_progress=recipe.logging.progress_bar)
        if sparsifier.frozen:  # masked-out latent weights must be exactly zero (under FSDP2 each rank checks its rows)
            violations = sum(int((local_tensor(layer.latent_weight).detach()[~layer.mask] != 0).sum())
                             for _, layer in sparsifier.named_layers())
            if violations:
                raise RuntimeError(f"{violations} masked weights of a frozen model are non-zero")
        record = self._log(tag, eval_top1=scores["top1"], eval_top5=scores["top5"], eval_loss=scores["loss"],
                           eval_examples=scores["num_examples"], eval_skipped_images=scores["skipped_examples"],
                           **model_figures(self.raw_model, sparsifier, recipe.data.input_size),
                           target_ratio=sparsifier.ratio, frozen=sparsifier.frozen,
                           layer_sparsity=sparsifier.layer_sparsity(), **extra)
        self.accelerator.print(f"[{tag}] step {record['step']} epoch {record['epoch']}: top1 {scores['top1']:.4f} "
                               f"top5 {scores['top5']:.4f} loss {scores['loss']:.4f} sparsity {record['sparsity']:.4f} "
                               f"MFLOPs {record['sparse_mflops']:.1f}/{record['dense_mflops']:.1f}")
        return record

    def _checkpoint(self) -> Path:
        """``accelerator.save_state`` + sparsifier, recipe and best weights, published as one folder."""
        accelerator, state = self.accelerator, self.state
        self.engine.sync_buffers()  # what is saved is the same on every rank

        def write(folder: Path) -> None:
            accelerator.save_state(str(folder))
            self.engine.save(folder)
            if accelerator.is_main_process:
                save_recipe(self.recipe, folder / "recipe.yaml")
                save_checkpoint_config(self.raw_model, self.recipe, folder)  # what st3_hf.from_pretrained reads
                self.best.save(folder)  # inside the temporary folder: published with the checkpoint

        state.log_records, state.best, state.elapsed_s = self.jsonl.count(), self.best.meta, time.time() - self.start_time
        state.train_loss_sum, state.train_loss_count = float(self.running_loss), self.running_count
        state.skipped_images = int(accelerator.reduce(self.skipped_images, reduction="sum"))
        return self.checkpoints.save(state.global_step, write, dataclasses.asdict(state),
                                     accelerator.is_main_process, accelerator.wait_for_everyone)

    def _log(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """One record (``kind``, step, epoch, ``fields``, elapsed seconds) to metrics.jsonl and its numbers to the trackers."""
        record = {"kind": kind, "step": self.state.global_step, "epoch": self.state.epoch, **fields,
                  "elapsed_s": time.time() - self.start_time}
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                             step=record["step"])
        self.jsonl.log(record)
        return record

    # ------------------------------------------------------------------ end
    def _finish(self) -> Dict[str, Any]:
        """Freeze, check the ranks agree, evaluate once more and export."""
        accelerator, recipe = self.accelerator, self.recipe
        if recipe.training.freeze_at_end:
            self.engine.sparsity.freeze()
        if accelerator.num_processes > 1:  # identical masks and weights on every process: a mismatch is a bug
            everyone = accelerator.gather(self.engine.agreement_row().to(accelerator.device).unsqueeze(0))
            if not bool((everyone == everyone[0:1]).all()):
                raise RuntimeError("processes disagree on masks or weights at the end of training")
        final = self._evaluate("final", num_processes=accelerator.num_processes,
                               ranks_agree=True) if recipe.evaluation.at_end else {}
        accelerator.wait_for_everyone()
        if recipe.hub.export:  # a collective under DeepSpeed (fp32 masters) and FSDP2 (a whole copy)
            exported = self.engine.export_copy(self.raw_model, self._build_model)
            if accelerator.is_main_process:
                self._export(final, *exported)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return final

    def _export(self, final: Dict[str, Any], model: nn.Module, sparsifier: Sparsifier) -> Path:
        from st3_hf.train.data import pretrained_cfg_for
        from st3_hf.train.run_export import export_run
        recipe, hub, start = self.recipe, self.recipe.hub, self.dense_start
        # no final evaluation: the card says "not evaluated" (not an earlier epoch's)
        metrics = {"top1": final["eval_top1"], "top5": final["eval_top5"], "loss": final["eval_loss"],
                   "eval_examples": final["eval_examples"]} if final else {}
        # what ran, for the card's headline (not the recipe's plan)
        steps, train_set = self.state.global_step, getattr(self.train_loader, "dataset", None)
        run = {"steps": steps, "epochs": steps / self.steps_per_epoch, "planned_epochs": self.run_epochs,
               "images_seen": steps * recipe.data.batch_size * recipe.training.gradient_accumulation_steps
               * self.accelerator.num_processes, "train_images": len(train_set) if train_set is not None else None}
        data_cfg = pretrained_cfg_for(recipe.data)
        if start is not None:
            from st3_hf.hub.dense_start import label_names
            names = label_names(start, int(recipe.model.num_classes))
            if names:
                data_cfg["label_names"] = names  # the inherited head keeps its classes
        metrics_file = self.output_dir / METRICS_FILENAME
        # paper figures come from the recipe; metrics.jsonl is copied into the export (a folder of export files only
        # is replaced whole)
        folder = export_run(model, sparsifier, self.output_dir, recipe, data_pretrained_cfg=data_cfg, metrics=metrics,
                            metrics_file=metrics_file if metrics_file.is_file() else None, run=run,
                            label_names=self.label_names or None, start_checkpoint=start.name if start is not None else None,
                            base_model=None if start is None or hub.base_model else start.repo_id)
        if hub.push:
            from st3_hf.hub.push import push_folder
            url = push_folder(folder, hub.repo_id, private=hub.private, revision=hub.revision)
            self.accelerator.print(f"pushed to {url}")
        return folder
