"""The training loop of one run: minibatches, the optimizer step, the schedule, logging, validation."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kalmanopt.runner.config import ExperimentConfig, RunSpec
from kalmanopt.runner.diagnostics import DiagnosticsRecorder
from kalmanopt.runner.distributed import Launch, device_of, global_mean, local_batch, wrap_model
from kalmanopt.runner.health import assess
from kalmanopt.runner.provenance import engine_of, resolved_hyperparameters
from kalmanopt.runner.results import json_safe as _json_safe
from kalmanopt.runner.storage import atomic_write_with, naming
from kalmanopt.runner.tasks import Dataset, Task

__all__ = ["MetricsLog", "train_run", "layer_names", "autocast_context", "PROGRESS_SECONDS"]

logger = logging.getLogger("kalmanopt.runner")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed as the run goes.

    Records carry ``run_id``, ``optimizer``, ``seed``, ``kind`` (``"train"``, ``"eval"``,
    ``"diagnostics"``, ``"analysis"``) and ``step``; see ``docs/runner.md``. Non-finite numbers
    are written as ``null`` (strict JSON).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        try:
            self._file.write(json.dumps(_json_safe(record)) + "\n")
            self._file.flush()
        except OSError as exc:  # (a full disk: name the file)
            raise naming(exc, self.path) from exc

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        """Every record of a ``metrics.jsonl`` file (a torn last line, from a hard kill, is skipped)."""
        records = []
        path = Path(path)
        if not path.exists():
            return records
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    @staticmethod
    def rename(path: str | Path, run_ids: dict[str, str]) -> None:
        """Give the records of each run in ``run_ids`` (old id -> new id) its new id, rewriting the file
        atomically as :meth:`keep_only` does (a line that is not a record is kept as it is)."""
        def renamed(line: str) -> str:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return line
            if not isinstance(record, dict) or record.get("run_id") not in run_ids:
                return line
            return json.dumps({**record, "run_id": run_ids[record["run_id"]]})

        if run_ids:
            _rewrite_lines(Path(path), renamed)

    @staticmethod
    def keep_only(path: str | Path, run_ids: set[str]) -> None:
        """Drop the records of runs not in ``run_ids`` (those a Ctrl-C cut short).

        The file is rewritten atomically (a temporary copy, synced, then renamed over it), line by
        line, so a kill during the rewrite leaves the old file whole; nothing is rewritten when
        every line is kept.
        """
        def keeps(line: str) -> bool:
            try:
                return json.loads(line).get("run_id") in run_ids
            except (json.JSONDecodeError, AttributeError):
                return False

        path = Path(path)
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            if all(keeps(line) for line in f if line.strip()):
                return
        _rewrite_lines(path, lambda line: line if keeps(line) else None)


def _rewrite_lines(path: Path, transform: Callable[[str], str | None]) -> None:
    """Rewrite ``path`` atomically, each non-blank line replaced by ``transform(line)`` (None drops it)."""
    if not path.exists():
        return

    def copy(out: Any) -> None:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    new = transform(line)
                    if new is not None:
                        out.write(new if new.endswith("\n") else new + "\n")

    atomic_write_with(path, copy)


def layer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """The Kalman optimizer's layer keys (``group0/param3``) mapped to the model's parameter names."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = {}
    for g, group in enumerate(optimizer.param_groups):
        names[f"group{g}/global"] = f"group{g}" if g else "all"
        for i, p in enumerate(group["params"]):
            names[f"group{g}/param{i}"] = by_id.get(id(p), f"group{g}/param{i}")
    return names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: seconds between progress lines written to the log during one run (besides the line at its end)
PROGRESS_SECONDS = 30.0


def autocast_context(config: ExperimentConfig, device: torch.device) -> Any:
    """bfloat16 autocast for ``autocast = "bf16"`` on CUDA; no autocast otherwise (the CPU included)."""
    if config.autocast == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_run(run: RunSpec, config: ExperimentConfig, task: Task, data: Dataset, log: MetricsLog, *,
              on_step: Callable[[int], None] | None = None,
              analysis: Callable[[nn.Module, torch.optim.Optimizer, int], dict[str, Any] | None] | None = None,
              launched: Launch | None = None) -> dict[str, Any]:
    """Train one run and return its result record (also writing its metrics to ``log``).

    Args:
        run: the optimizer, keyword setting and seed.
        config: the experiment (epochs or steps, batch size, schedule, logging).
        task: the task; ``data`` its loaded data, already on the training device.
        log: where per-step metrics go.
        on_step: called with the number of steps just taken (progress bars).
        analysis: called at the analysis steps with (model, optimizer, step); what it returns is
            logged as an ``"analysis"`` record.
        launched: several processes (``distributed = "ddp" | "fsdp"``): the model is wrapped, each
            rank trains on its slice of every minibatch, and the logged losses are the ranks' mean.

    A ``KeyboardInterrupt`` propagates (the caller keeps what finished); a run whose training
    loss becomes non-finite stops early with ``status = "diverged"``. ``seconds_per_step`` times
    the steps that record no diagnostics (see :mod:`kalmanopt.runner.diagnostics`); the record's
    ``status`` is its health (:mod:`kalmanopt.runner.health`).
    """
    launched = launched or Launch()
    device = device_of(config.resolved_device()) if launched.active else config.resolved_device()
    spec = run.optimizer
    torch.manual_seed(run.seed)
    model = wrap_model(task.build_model(config.model, data, config.model_options).to(device), launched)
    model.train()
    optimizer = spec.build(model.parameters(), run.hyperparameters, track_diagnostics=False,
                           loss_statistic=task.loss_statistic, model=model)
    built_with = resolved_hyperparameters(optimizer)  # before the schedule scales lr
    names = layer_names(model, optimizer)
    steps_per_epoch = task.steps_per_epoch(data, config.batch_size)
    total = config.total_steps(steps_per_epoch)
    unit = steps_per_epoch if config.epochs is not None else 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.schedule.factor(unit, total))
    eval_every = config.eval_every or (steps_per_epoch if config.epochs is not None else max(1, total // 20))
    analysis_every = int(config.analysis.get("every", 0) or 0)
    recorder = DiagnosticsRecorder(optimizer, (config.diagnostics_every or config.log_every)
                                   if config.diagnostics else 0, names)
    amp = autocast_context(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(run.seed)
    base = {"run_id": run.run_id, "optimizer": spec.label, "seed": run.seed}

    log_sum = torch.zeros((), device=device)
    eval_sum = torch.zeros((), device=device)
    log_count = eval_count = 0
    step = 0
    recorded = 0  # steps that recorded diagnostics (left out of the timing)
    status = "finished"
    figures: dict[str, float] = {}
    final_train_loss = initial_train_loss = math.nan
    outside = 0.0  # seconds spent validating, logging, recording diagnostics and analysing
    start = last_note = time.perf_counter()

    last_analysis: dict[str, Any] = {}
    analysed_at = -1

    def record_analysis() -> None:
        nonlocal outside, last_analysis, analysed_at
        t0 = time.perf_counter()
        found = analysis(model, optimizer, step) if analysis is not None else None
        if found:
            log.write({**base, "kind": "analysis", "step": step, "epoch": step / steps_per_epoch, **found})
            last_analysis = found
        analysed_at = step
        outside += time.perf_counter() - t0

    if analysis is not None:
        record_analysis()
    while step < total and status == "finished":
        for inputs, targets in task.batches(data, config.batch_size, generator):
            recording = recorder.due(step + 1)
            if recording:
                _sync(device)
                t_record = time.perf_counter()
                recorder.start()
            inputs, targets = local_batch(inputs, targets, launched)
            with amp:
                losses = task.per_sample_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            if spec.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, spec.clip_grad_norm)
            if spec.is_kalman:
                optimizer.step(loss=losses.detach())
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            mean_loss = global_mean(losses.detach().mean(), launched)
            if step == 1:
                initial_train_loss = float(mean_loss)
            log_sum += mean_loss
            eval_sum += mean_loss
            log_count += 1
            eval_count += 1
            epoch = step / steps_per_epoch
            if recording:
                diag = recorder.finish()
                log.write({**base, "kind": "diagnostics", "step": step, "epoch": epoch, **diag})
                recorded += 1
                _sync(device)
                outside += time.perf_counter() - t_record
            if on_step is not None:
                on_step(1)
            if step % config.log_every == 0 or step == total:
                t0 = time.perf_counter()
                train_loss = float(log_sum) / log_count
                log.write({**base, "kind": "train", "step": step, "epoch": epoch, "train_loss": train_loss,
                           "lr": optimizer.param_groups[0]["lr"]})
                log_sum.zero_()
                log_count = 0
                outside += time.perf_counter() - t0
                if not math.isfinite(train_loss):
                    status = "diverged"
            if status == "finished" and (step % eval_every == 0 or step == total):
                t0 = time.perf_counter()
                final_train_loss = float(eval_sum) / eval_count
                eval_sum.zero_()
                eval_count = 0
                with amp:
                    figures = task.evaluate(model, data, config.eval_batch_size)
                log.write({**base, "kind": "eval", "step": step, "epoch": epoch,
                           "train_loss": final_train_loss, **figures})
                if not math.isfinite(final_train_loss):
                    status = "diverged"
                elif time.perf_counter() - last_note >= PROGRESS_SECONDS:
                    last_note = time.perf_counter()
                    logger.info("  %s seed %d: step %d/%d, train loss %.4g, %s", spec.label, run.seed, step, total,
                                final_train_loss, ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
                outside += time.perf_counter() - t0
            if analysis_every and step % analysis_every == 0:
                record_analysis()
            if step >= total or status != "finished":
                break
    if analysis is not None and analysed_at != step and status == "finished":
        record_analysis()
    _sync(device)
    seconds = time.perf_counter() - start
    if status == "diverged":
        with amp:
            figures = {k: math.nan for k in (figures or task.evaluate(model, data, config.eval_batch_size))}
        final_train_loss = math.nan
    timed = step - recorded
    result: dict[str, Any] = {
        **base,
        "method": spec.describe(),
        "engine": engine_of(optimizer),
        "task": config.task,
        "model": config.model,
        "hyperparameters": dict(run.hyperparameters),
        "resolved_hyperparameters": built_with,
        "clip_grad_norm": spec.clip_grad_norm,
        "others": dict(spec.others),
        "status": status,
        "status_reason": "",
        "steps": step,
        "epochs": step / steps_per_epoch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "initial_train_loss": initial_train_loss,
        "final_train_loss": final_train_loss,
        **figures,
        "seconds": seconds,
        "seconds_per_step": (seconds - outside) / timed if timed > 0 else math.nan,
        "timed_steps": timed,
    }
    result.update(last_analysis)
    if spec.is_kalman:
        result["counters"] = optimizer.diagnostics()["counters"]
    result["status"], result["status_reason"] = assess(result, layers=len(params),
                                                       num_classes=data.info.get("num_classes"))
    return result
