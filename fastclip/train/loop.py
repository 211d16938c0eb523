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
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastclip.loss import ClipLoss, SigLipLoss
from fastclip.model.factory import create_model
from fastclip.tokenizer import ClipTokenizer
from fastclip.train.config import TrainConfig
from fastclip.train.data import DataHealth, build_train_data
from fastclip.train.evaluate import evaluate_zero_shot
from fastclip.train.interrupt import StopSignals, TrainingInterrupted
from fastclip.train.metrics import MetricsLog, drop_rows_after, plot_curves
from fastclip.train.optim import make_optimizer, make_scheduler
from fastclip.train.outputs import clear_previous_run, refuse_reused_folder, write_config
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
from fastclip.train.warmup import warm_up_attention

MAX_LOG_SCALE = math.log(100.0)  # logit_scale (CLIP's, or SigLIP's) is clamped to [0, ln 100] after every step, as in CLIP
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


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the matmuls run in: "auto" is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: autocast in bf16/fp16, or nothing for fp32."""
    dtype = compute_dtype(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


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


def _loss(loss_fn, images, texts, scale, labels):
    if isinstance(loss_fn, SigLipLoss):
        return loss_fn(images, texts, labels=labels)  # its own scale and bias, not the model's
    return loss_fn(images, texts, scale, labels=labels)


def _batch_labels(group, device) -> torch.Tensor | None:
    """The class ids of the whole accumulated batch, in the order its features are concatenated."""
    labelled = [b.labels is not None for b in group]
    if not any(labelled):
        return None
    if not all(labelled):
        raise ValueError("some micro-batches carry labels and some do not")
    return torch.cat([b.labels for b in group]).to(device, non_blocking=True)


def _train_step(model, loss_fn, group, *, device, autocast, scaler, ddp: bool) -> float:
    """Forward and backward of one optimizer step over the micro-batches in `group`; returns the loss."""
    inputs = [(b.images.to(device, non_blocking=True), b.tokens.to(device, non_blocking=True)) for b in group]
    labels = _batch_labels(group, device)
    if len(inputs) == 1:
        with autocast():
            image, text, scale = model(*inputs[0])
            loss = _loss(loss_fn, image, text, scale, labels)
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
            loss = _loss(loss_fn, images, texts, scale, labels)
        scaler.scale(loss).backward()
    for param in loss_fn.parameters():  # SigLIP's scale and bias took the whole gradient in each of the k passes
        if param.grad is not None:
            param.grad.div_(len(inputs))
    return loss.item()


def _build_model(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = create_model(config.model, pretrained=config.pretrained, attn_backend=config.attn_backend,
                         grad_checkpointing=config.grad_checkpointing, device=device)
    if config.lock_image:
        model.visual.requires_grad_(False)
    return model


def _build_loss(config: TrainConfig, model, device: torch.device) -> tuple[torch.nn.Module, SigLipLoss | None]:
    """(the loss, the same loss when it has parameters to train and save, else None)."""
    if config.loss == "siglip":
        loss_fn = SigLipLoss().to(device)  # SigLIP's init: scale log 10, bias -10
        model.logit_scale.requires_grad_(False)  # unused by the loss: frozen, so DDP sees no unused parameter
        return loss_fn, loss_fn
    return ClipLoss(weight=config.loss_weight, label_smoothing=config.label_smoothing), None


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
        print(f"no zero-shot evaluation: a {config.dataset} run evaluates only on --eval-images FOLDER "
              f"(one sub-folder per class), which was not given", file=sys.stderr)
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


def _metrics_row(progress: Progress, loss: float, lr: float, scale_param, learned_loss, samples_per_s: float) -> dict:
    # the loss is the global batch's, the same on every rank: nothing to average
    row = {"step": progress.step, "epoch": progress.epoch, "loss": loss, "lr": lr,
           "logit_scale": scale_param.exp().item(), "samples_per_s": samples_per_s,
           "samples_seen": progress.samples_seen, "skipped": progress.skipped,
           "nonfinite_skipped": progress.nonfinite_skipped}
    if learned_loss is not None:
        row["logit_bias"] = learned_loss.logit_bias.item()
    return row


def train(config: TrainConfig, *, show_progress: bool | None = None) -> TrainResult:
    """Train a CLIP model as `config` says; see TrainConfig for every option. On SIGINT/SIGTERM it saves
    the last finished step and raises `TrainingInterrupted`."""
    rank, world_size, device = setup_distributed(config.device)
    is_main = rank == 0
    output_dir = Path(config.output_dir)
    if is_main:  # before any slow setup: two runs never share a folder
        refuse_reused_folder(output_dir, resume=config.resume, overwrite=config.overwrite)
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)

    model = _build_model(config, device)
    loss_fn, learned_loss = _build_loss(config, model, device)
    tokenizer = ClipTokenizer(context_length=model.config.text.context_length)
    data = build_train_data(config, model.image_size, tokenizer, rank=rank, world_size=world_size)
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                               betas=(config.beta1, config.beta2), eps=config.eps, extra=learned_loss)
    scheduler = make_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps)
    autocast = autocast_for(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    if is_main:
        _prepare_output_folder(output_dir, config, model, optimizer)

    progress = Progress()
    if config.resume:
        progress, _ = load_training_state(resolve_resume(config.resume, output_dir / "checkpoints"), model=model,
                                          optimizer=optimizer, scheduler=scheduler, scaler=scaler, loss=learned_loss)
        if is_main:
            drop_rows_after(output_dir, progress.step)
    # Every rank autotunes the attention kernels here, together, rather than at random steps later.
    warm_up_attention(model, config.batch_size, device, autocast, compute_dtype(config.precision, device))
    ddp = world_size > 1
    trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    _set_train_mode(model, config)

    result = TrainResult(output_dir=output_dir)
    log = MetricsLog(output_dir, tensorboard=config.tensorboard) if is_main else None
    if is_main:
        write_config(output_dir, config.to_dict())
    evaluates = _evaluates(config, is_main)
    show = is_main and (sys.stderr.isatty() if show_progress is None else show_progress)
    bar = tqdm(total=config.steps, initial=progress.step, desc="train", unit="step", disable=not show, dynamic_ncols=True)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(loss_fn.parameters())
    scale_param = learned_loss.logit_scale if learned_loss is not None else model.logit_scale
    health = DataHealth(config.max_skip_fraction, data.lookup)
    window_start, window_samples = time.perf_counter(), 0
    nonfinite_in_a_row = 0
    saved: dict[str, Any] = {"step": None, "path": None}  # the last checkpoint written

    def evaluate() -> None:
        if is_main and evaluates:
            scores = evaluate_zero_shot(model, tokenizer, image_folder=config.eval_images, synthetic_samples=config.eval_samples,
                                        seed=config.seed + 1, device=device, autocast=autocast)
            row = {"step": progress.step, **scores}
            _set_train_mode(model, config)
            result.evals.append(row)
            log.write("eval", row)
            bar.write("eval step {step}: ".format(**row) + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if ddp:
            dist.barrier()

    def save() -> Path | None:
        if is_main and saved["step"] != progress.step:
            with stop.saving_checkpoint():  # a signal now waits: the stop it asks for saves anyway
                path = save_training_state(output_dir / "checkpoints", model=model, optimizer=optimizer, scheduler=scheduler,
                                           scaler=scaler, progress=progress, config=config.to_dict(), loss=learned_loss)
                prune_checkpoints(output_dir / "checkpoints", config.keep_checkpoints, path)
            saved.update(step=progress.step, path=path)
        return saved["path"]

    with StopSignals() as stop, contextlib.closing(_micro_batches(data, progress, config.accum_steps, health)) as batches:
        while progress.step < config.steps:
            group = next(batches)
            loss = _train_step(trained, loss_fn, group, device=device, autocast=autocast, scaler=scaler, ddp=ddp)
            if not math.isfinite(loss):  # every rank sees the same value: the loss is the global batch's
                message = f"the loss became {loss} at step {progress.step + 1}"
                nonfinite_in_a_row += 1
                if config.nonfinite == "stop" or nonfinite_in_a_row > MAX_CONSECUTIVE_NONFINITE:
                    raise FloatingPointError(f"{message}; lower lr, use precision=bf16/fp32, or nonfinite=skip")
                optimizer.zero_grad(set_to_none=True)  # drop this update; the micro-batches stay consumed
                progress.nonfinite_skipped += 1
                bar.write(f"{message}: update skipped ({progress.nonfinite_skipped} so far)")
                continue
            nonfinite_in_a_row = 0
            _optimizer_step(optimizer, scheduler, scaler, trainable, config.grad_clip, scale_param)
            progress.step += 1
            step_samples = sum(b.images.shape[0] for b in group) * world_size
            progress.samples_seen += step_samples
            window_samples += step_samples
            result.losses.append(loss)
            bar.update(1)

            if progress.step % config.log_every == 0 or progress.step == config.steps:
                per_s = window_samples / max(time.perf_counter() - window_start, 1e-9)
                row = _metrics_row(progress, loss, scheduler.get_last_lr()[0], scale_param, learned_loss, per_s)
                if is_main:
                    log.write("metrics", row)
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{per_s:.0f}", lr=f"{row['lr']:.2e}")
                window_start, window_samples = time.perf_counter(), 0
            if config.eval_every and progress.step % config.eval_every == 0 and progress.step < config.steps:
                evaluate()
            if config.save_every and progress.step % config.save_every == 0 and progress.step < config.steps:
                save()
            if stop.requested(ddp, device):
                _stop(save, progress.step, ddp, bar, log)

        bar.close()
        evaluate()
        save()
    result.skipped = progress.skipped
    _report_skipped(health, progress.skipped, is_main)
    if is_main:
        from fastclip.checkpoint import save_checkpoint

        result.model_path = output_dir / "model.safetensors"
        save_checkpoint(model, result.model_path)
        plot_curves(output_dir, loss_name="sigmoid loss" if config.loss == "siglip" else "contrastive loss")
        log.close()
    return result


def _report_skipped(health: DataHealth, skipped: int, is_main: bool) -> None:
    """At the end of a run: the reasons still held back (a run shorter than the check), and the count."""
    health.flush()
    if skipped and is_main:
        print(f"skipped {skipped} unreadable samples on rank 0 (reasons logged above, once per file)", file=sys.stderr)


def _stop(save, step: int, ddp: bool, bar, log: MetricsLog | None) -> None:
    """End the run at a stop signal: checkpoint this step (rank 0), then raise TrainingInterrupted everywhere."""
    path = save()
    if ddp:
        dist.barrier()  # rank 0's checkpoint is complete before any rank exits
    bar.close()
    if log is not None:
        log.close()
    raise TrainingInterrupted(step, path)


def _set_train_mode(model, config: TrainConfig) -> None:
    model.train()
    if config.lock_image:
        model.visual.eval()  # frozen: keep its normalisation statistics too


def summary(result: TrainResult) -> dict[str, Any]:
    return {"final_loss": result.losses[-1] if result.losses else None, "evals": result.evals,
            "skipped": result.skipped, "model": str(result.model_path) if result.model_path else None}
