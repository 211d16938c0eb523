"""`train(config)`: the CLIP training loop behind `fastclip train` and `fastclip demo`.

One optimizer step = `accum_steps` micro-batches. With accumulation the loss still sees the whole
accumulated batch (as open_clip's accumulation does): the features of every micro-batch are first
computed without gradients, then each micro-batch is re-run with gradients and its features replace
their cached copies in the full-batch loss, so the summed gradients equal the full batch's exactly.
logit_scale enters each of those passes with 1/accum_steps of its gradient (same value), so it too
gets exactly the full-batch gradient, and no parameter is unused in any pass (DDP requires that).

With loss="siglip" the loss is `SigLipLoss` with its own learnable scale and bias (SigLIP's log 10 and
-10 at init), trained with the model (no weight decay), clamped like CLIP's scale and saved in the
checkpoints; the model's own logit_scale is then frozen (unused). Its scale and bias enter every
accumulation pass whole, and their summed gradient is divided by accum_steps: again the full batch's.
With use_labels each batch's class ids go to the loss (`labels=`, concatenated over the accumulated
micro-batches like the features): every pair of equal labels in the global batch is a positive.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, the loss gathers the
features (and labels) of every rank, rank 0 logs, evaluates and saves. SigLipLoss averages the
gradients of its own parameters across ranks itself; they are not DDP's.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastclip.model.clip import MAX_LOGIT_SCALE
from fastclip.model.factory import create_model
from fastclip.tokenizer import ClipTokenizer
from fastclip.train.config import TrainConfig
from fastclip.train.data import DataHealth, build_train_data
from fastclip.train.interrupt import StopSignals, TrainingInterrupted
from fastclip.train.metrics import MetricsLog, drop_rows_after, plot_curves
from fastclip.train.optim import make_optimizer, make_scheduler
from fastclip.train.outputs import clear_previous_run, refuse_reused_folder, write_config
from fastclip.train.precision import autocast_for, compute_dtype
from fastclip.train.state import (
    Progress,
    check_output_folder,
    checkpoint_bytes,
    load_training_state,
    prune_checkpoints,
    remove_stale_temporaries,
    resolve_resume,
    save_training_state,
    saved_checkpoints_at_peak,
    weight_bytes,
)
from fastclip.train.training_loss import TrainingLoss, as_training_loss, build_training_loss
from fastclip.train.warmup import share_tuned_configs, warm_up_attention
from fastclip.train.zero_shot_eval import evaluate_zero_shot

# logit_scale (CLIP's, or SigLIP's) is clamped to [0, ln 100] after every step, as in CLIP
MAX_LOG_SCALE = math.log(MAX_LOGIT_SCALE)
MAX_CONSECUTIVE_NONFINITE = 20  # with nonfinite="skip": past this many in a row the run is broken, not unlucky


@dataclass
class TrainResult:
    """What a run produced: per-step losses (this process), evaluations, and the files written."""

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0
    output_dir: Path | None = None
    model_path: Path | None = None


def setup_distributed(device_option: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_option != "cpu" else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if device_option is not None:
        device = torch.device(device_option)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world_size, device


def _micro_batches(data, progress: Progress, accum_steps: int, health: DataHealth):
    """Groups of `accum_steps` non-empty micro-batches, advancing `progress`' data position as it goes;
    `health` sees every micro-batch, and stops the run when the data cannot be read."""
    group = []
    while True:
        empty_epoch, whole_epoch, read = True, progress.batches_in_epoch == 0, 0
        for batch in data.iterate(progress.epoch, progress.batches_in_epoch):
            empty_epoch = False
            progress.batches_in_epoch += 1
            progress.skipped += batch.skipped
            health.add(batch)
            read += batch.images.shape[0]
            if batch.images.shape[0] == 0:
                continue  # every sample of this batch was unreadable
            group.append(batch)
            if len(group) == accum_steps:
                yield group
                group = []
        if empty_epoch and progress.batches_in_epoch == 0:
            raise ValueError("the training data yielded no batch in a whole epoch")
        if whole_epoch:  # a resumed epoch's tail alone says nothing about the data
            health.end_epoch(read)
        progress.epoch += 1
        progress.batches_in_epoch = 0


def _batch_labels(group, device) -> torch.Tensor | None:
    """The class ids of the whole accumulated batch, in the order its features are concatenated."""
    labelled = [b.labels is not None for b in group]
    if not any(labelled):
        return None
    if not all(labelled):
        raise ValueError("some micro-batches carry labels and some do not")
    return torch.cat([b.labels for b in group]).to(device, non_blocking=True)


def _train_step(model, loss_fn: TrainingLoss | torch.nn.Module, group, *, device, autocast, scaler, ddp: bool) -> float:
    """Forward and backward of one optimizer step over the micro-batches in `group`; returns the loss.
    `loss_fn` is a TrainingLoss, or a bare loss module (adapted by `as_training_loss`)."""
    loss_fn = as_training_loss(loss_fn)
    inputs = [(b.images.to(device, non_blocking=True), b.tokens.to(device, non_blocking=True)) for b in group]
    labels = _batch_labels(group, device)
    if len(inputs) == 1:
        with autocast():
            image, text, scale = model(*inputs[0])
            loss = loss_fn(image, text, scale, labels)
        scaler.scale(loss).backward()
        return loss.item()
    with torch.no_grad(), autocast():
        cached = [model(*pair)[:2] for pair in inputs]
    for j, pair in enumerate(inputs):
        sync = contextlib.nullcontext() if not ddp or j == len(inputs) - 1 else model.no_sync()
        with sync, autocast():
            image_j, text_j, scale = model(*pair)
            images = torch.cat([image_j if i == j else c[0] for i, c in enumerate(cached)])
            texts = torch.cat([text_j if i == j else c[1] for i, c in enumerate(cached)])
            scale = scale / len(inputs) + scale.detach() * (1 - 1 / len(inputs))  # value s, 1/k of its gradient
            loss = loss_fn(images, texts, scale, labels)
        scaler.scale(loss).backward()
    for param in loss_fn.parameters():  # SigLIP's scale and bias took the whole gradient in each of the k passes
        if param.grad is not None:
            param.grad.div_(len(inputs))
    return loss.item()


def _build_model(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = create_model(
        config.model,
        pretrained=config.pretrained,
        attn_backend=config.attn_backend,
        grad_checkpointing=config.grad_checkpointing,
        device=device,
    )
    if config.lock_image:
        model.visual.requires_grad_(False)
    return model


def _planned_saves(config: TrainConfig) -> int:
    """Checkpoints a run writes: every save_every steps before the last, and at the end (or when stopped)."""
    return 1 + ((config.steps - 1) // config.save_every if config.save_every else 0)


def _prepare_output_folder(folder: Path, config: TrainConfig, model, optimizer) -> None:
    """Rank 0, once everything else is set up: clear an overwritten run, then check the folder."""
    if config.overwrite:
        clear_previous_run(folder)
    # Fail now rather than at the first save, hours in: the checkpoints kept (plus the one being
    # written) and the final weights must fit.
    held = saved_checkpoints_at_peak(config.keep_checkpoints, _planned_saves(config))
    check_output_folder(folder, held * checkpoint_bytes(model, optimizer) + weight_bytes(model))
    remove_stale_temporaries(folder / "checkpoints")  # left by a run killed while saving


def _evaluates(config: TrainConfig, is_main: bool) -> bool:
    """Whether the run evaluates zero-shot. A csv or shards run without eval_images does not: the synthetic
    shapes' numbers would say nothing about its data. Says so once."""
    if config.eval_images or config.dataset == "synthetic":
        return True
    if is_main:
        print(
            f"no zero-shot evaluation: a {config.dataset} run evaluates only on --eval-images FOLDER "
            f"(one sub-folder per class), which was not given",
            file=sys.stderr,
        )
    return False


def _optimizer_step(optimizer, scheduler, scaler, trainable, grad_clip: float, scale_param) -> None:
    """Apply the accumulated gradients: unscale, clip, step, advance the schedule, clamp the logit scale."""
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    with torch.no_grad():
        scale_param.clamp_(0.0, MAX_LOG_SCALE)


def _due(every: int, step: int, last: int) -> bool:
    """Whether a periodic action (every `every` steps, 0: never) falls on `step`, the end excepted."""
    return bool(every) and step % every == 0 and step < last


class _Run:
    """One training run: what `train` builds (model, loss, optimizer, data, state), then its step,
    evaluation and checkpoint. Every rank trains; rank 0 alone logs, evaluates and writes."""

    def __init__(self, config: TrainConfig, show_progress: bool | None) -> None:
        self.config = config
        rank, self.world_size, self.device = setup_distributed(config.device)
        self.is_main, self.ddp = rank == 0, self.world_size > 1
        self.output_dir = Path(config.output_dir)
        if self.is_main:  # before any slow setup: two runs never share a folder
            refuse_reused_folder(self.output_dir, resume=config.resume, overwrite=config.overwrite)
        torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
        self._build(rank)
        self._restore()
        self._prepare_model()
        self._open_outputs(show_progress)

    # --- building the run

    def _build(self, rank: int) -> None:
        """Model, loss, tokenizer, data, optimizer, schedule and mixed precision; rank 0 checks the folder."""
        config, device = self.config, self.device
        self.model = _build_model(config, device)
        self.loss = build_training_loss(config, self.model, device)
        self.tokenizer = ClipTokenizer(context_length=self.model.config.text.context_length)
        self.data = build_train_data(
            config, self.model.image_size, self.tokenizer, rank=rank, world_size=self.world_size
        )
        self.optimizer = make_optimizer(
            self.model,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            extra=self.loss.learned,
        )
        self.scheduler = make_scheduler(self.optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps)
        self.autocast = autocast_for(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        if self.is_main:
            _prepare_output_folder(self.output_dir, self.config, self.model, self.optimizer)

    def _restore(self) -> None:
        """The progress so far: a fresh start, or the state of the checkpoint to resume."""
        self.progress = Progress()
        if not self.config.resume:
            return
        path = resolve_resume(self.config.resume, self.output_dir / "checkpoints")
        self.progress, _ = load_training_state(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            loss=self.loss.learned,
        )
        if self.is_main:
            drop_rows_after(self.output_dir, self.progress.step)

    def _prepare_model(self) -> None:
        """Tune the attention kernels, wrap the model for DDP, and put it in training mode."""
        config, device = self.config, self.device
        # Every rank autotunes the attention kernels here, together, rather than at random steps later.
        dtype = compute_dtype(config.precision, device)
        if warm_up_attention(self.model, config.batch_size, device, self.autocast, dtype) > 0:
            share_tuned_configs()  # and with the same configs, so that every rank rounds the same way
        device_ids = [device.index] if device.type == "cuda" else None
        self.trained = (
            torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids) if self.ddp else self.model
        )
        _set_train_mode(self.model, config)

    def _open_outputs(self, show_progress: bool | None) -> None:
        """The result, the logs (rank 0), the progress bar and the per-step bookkeeping."""
        config = self.config
        self.result = TrainResult(output_dir=self.output_dir)
        self.log = MetricsLog(self.output_dir, tensorboard=config.tensorboard) if self.is_main else None
        if self.is_main:
            write_config(self.output_dir, config.to_dict())
        self.evaluates = _evaluates(config, self.is_main)
        show = self.is_main and (sys.stderr.isatty() if show_progress is None else show_progress)
        self.bar = tqdm(
            total=config.steps,
            initial=self.progress.step,
            desc="train",
            unit="step",
            disable=not show,
            dynamic_ncols=True,
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad] + self.loss.parameters()
        self.log_scale = self.loss.log_scale(self.model)
        self.health = DataHealth(config.max_skip_fraction, self.data.lookup)
        self.window_start, self.window_samples = time.perf_counter(), 0
        self.nonfinite_in_a_row = 0
        self.saved_step: int | None = None  # the step of the last checkpoint written, and its path
        self.saved_path: Path | None = None

    # --- one step

    def step(self, group: list) -> bool:
        """One optimizer step over the micro-batches in `group`; False when a non-finite loss dropped it."""
        loss = _train_step(
            self.trained, self.loss, group, device=self.device, autocast=self.autocast, scaler=self.scaler, ddp=self.ddp
        )
        if not math.isfinite(loss):  # every rank sees the same value: the loss is the global batch's
            self._drop_nonfinite(loss)
            return False
        self.nonfinite_in_a_row = 0
        _optimizer_step(
            self.optimizer, self.scheduler, self.scaler, self.trainable, self.config.grad_clip, self.log_scale
        )
        self.progress.step += 1
        step_samples = sum(b.images.shape[0] for b in group) * self.world_size
        self.progress.samples_seen += step_samples
        self.window_samples += step_samples
        self.result.losses.append(loss)
        self.bar.update(1)
        self._log_metrics(loss)
        return True

    def _drop_nonfinite(self, loss: float) -> None:
        """Skip the update of a non-finite loss, or stop the run as `config.nonfinite` says."""
        message = f"the loss became {loss} at step {self.progress.step + 1}"
        self.nonfinite_in_a_row += 1
        if self.config.nonfinite == "stop" or self.nonfinite_in_a_row > MAX_CONSECUTIVE_NONFINITE:
            raise FloatingPointError(f"{message}; lower lr, use precision=bf16/fp32, or nonfinite=skip")
        self.optimizer.zero_grad(set_to_none=True)  # drop this update; the micro-batches stay consumed
        self.progress.nonfinite_skipped += 1
        self.bar.write(f"{message}: update skipped ({self.progress.nonfinite_skipped} so far)")

    def _log_metrics(self, loss: float) -> None:
        """A metrics row every log_every steps and at the last; the throughput is over the steps since the last."""
        step = self.progress.step
        if step % self.config.log_every != 0 and step != self.config.steps:
            return
        per_s = self.window_samples / max(time.perf_counter() - self.window_start, 1e-9)
        # the loss is the global batch's, the same on every rank: nothing to average
        row = {
            "step": step,
            "epoch": self.progress.epoch,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": self.log_scale.exp().item(),
            "samples_per_s": per_s,
            "samples_seen": self.progress.samples_seen,
            "skipped": self.progress.skipped,
            "nonfinite_skipped": self.progress.nonfinite_skipped,
            **self.loss.metrics(),
        }
        if self.is_main:
            self.log.write("metrics", row)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{per_s:.0f}", lr=f"{row['lr']:.2e}")
        self.window_start, self.window_samples = time.perf_counter(), 0

    def after_step(self, stop: StopSignals) -> None:
        """The periodic evaluation and checkpoint, then the stop a signal asked for."""
        step, config = self.progress.step, self.config
        if _due(config.eval_every, step, config.steps):
            self.evaluate()
        if _due(config.save_every, step, config.steps):
            self.save(stop)
        if stop.requested(self.ddp, self.device):
            self._interrupt(stop)

    # --- evaluation and saving

    def evaluate(self) -> None:
        """Zero-shot accuracy now (rank 0, when the run evaluates); the other ranks wait for it."""
        if self.is_main and self.evaluates:
            config = self.config
            scores = evaluate_zero_shot(
                self.model,
                self.tokenizer,
                image_folder=config.eval_images,
                synthetic_samples=config.eval_samples,
                seed=config.seed + 1,
                device=self.device,
                autocast=self.autocast,
            )
            row = {"step": self.progress.step, **scores}
            _set_train_mode(self.model, config)
            self.result.evals.append(row)
            self.log.write("eval", row)
            self.bar.write("eval step {step}: ".format(**row) + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if self.ddp:
            dist.barrier()

    def save(self, stop: StopSignals) -> Path | None:
        """Checkpoint this step (rank 0, once per step); the path of the last checkpoint written."""
        if self.is_main and self.saved_step != self.progress.step:
            folder = self.output_dir / "checkpoints"
            with stop.saving_checkpoint():  # a signal now waits: the stop it asks for saves anyway
                path = save_training_state(
                    folder,
                    model=self.model,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    scaler=self.scaler,
                    progress=self.progress,
                    config=self.config.to_dict(),
                    loss=self.loss.learned,
                )
                prune_checkpoints(folder, self.config.keep_checkpoints, path)
            self.saved_step, self.saved_path = self.progress.step, path
        return self.saved_path

    def _interrupt(self, stop: StopSignals) -> NoReturn:
        """End the run at a stop signal: checkpoint this step (rank 0), then raise TrainingInterrupted everywhere."""
        path = self.save(stop)
        if self.ddp:
            dist.barrier()  # rank 0's checkpoint is complete before any rank exits
        self.bar.close()
        if self.log is not None:
            self.log.close()
        raise TrainingInterrupted(self.progress.step, path)

    def finish(self) -> TrainResult:
        """After the last step: report skipped samples; rank 0 writes the final weights and the curves."""
        self.result.skipped = self.progress.skipped
        _report_skipped(self.health, self.progress.skipped, self.is_main)
        if self.is_main:
            from fastclip.checkpoint import save_checkpoint

            self.result.model_path = self.output_dir / "model.safetensors"
            save_checkpoint(self.model, self.result.model_path)
            plot_curves(self.output_dir, loss_name=self.loss.curve_label)
            self.log.close()
        return self.result


def train(config: TrainConfig, *, show_progress: bool | None = None) -> TrainResult:
    """Train a CLIP model as `config` says; see TrainConfig for every option. On SIGINT/SIGTERM it saves
    the last finished step and raises `TrainingInterrupted`."""
    run = _Run(config, show_progress)
    batches = _micro_batches(run.data, run.progress, config.accum_steps, run.health)
    with StopSignals() as stop, contextlib.closing(batches):
        while run.progress.step < config.steps:
            if run.step(next(batches)):
                run.after_step(stop)
        run.bar.close()
        run.evaluate()
        run.save(stop)
    return run.finish()


def _report_skipped(health: DataHealth, skipped: int, is_main: bool) -> None:
    """At the end of a run: the reasons still held back (a run shorter than the check), and the count."""
    health.flush()
    if skipped and is_main:
        print(f"skipped {skipped} unreadable samples on rank 0 (reasons logged above, once per file)", file=sys.stderr)


def _set_train_mode(model, config: TrainConfig) -> None:
    model.train()
    if config.lock_image:
        model.visual.eval()  # frozen: keep its normalisation statistics too


def summary(result: TrainResult) -> dict[str, Any]:
    return {
        "final_loss": result.losses[-1] if result.losses else None,
        "evals": result.evals,
        "skipped": result.skipped,
        "model": str(result.model_path) if result.model_path else None,
    }
