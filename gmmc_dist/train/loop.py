"""The per-worker training function run by every Ray Train worker (one DDP process each).

`train_loop_per_worker(loop_config)` is importable so that tests, the driver and Ray Tune call the
same code. Each worker streams its share of the training shards, runs its own sampling chains
against a replay buffer, and reports the same metrics through `ray.train.report` once per epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from .. import __version__, checkpoint, storage
from ..buffer import build_buffer
from ..config import Config
from ..data.loader import make_train_loader
from ..models import build_model, model_summary
from ..objectives import LossTerms, beta_at, gmmc_loss, jem_loss, softmax_loss
from ..samplers import build_sampler
from .results import all_reduce_sum, barrier, estimate_gamma2, evaluate_test_split, sample_grid_png

logger = logging.getLogger("gmmc_dist.train")

# Per-epoch sums: the first four are kept on the device (no host synchronisation per step), the
# rest are known on the host. All are reduced over ranks once per epoch.
_DEVICE_SUMS = ("loss", "data_energy", "sample_energy", "correct")
_HOST_SUMS = ("images", "sampled_batches", "beta")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train one worker. `loop_config` contains "config" (a `Config.to_dict()`) and optionally
    "shared_buffer" (handles of the shared replay buffer actors, created by the driver)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = Config.from_dict(loop_config["config"])
    apply_s3_endpoint(config.run.s3_endpoint_url)
    context = ray.train.get_context()
    WorkerRun(config, context.get_world_rank(), context.get_world_size(), loop_config.get("shared_buffer")).run()


def apply_s3_endpoint(endpoint_url: str) -> None:
    """Point this worker's s3:// reads and writes at `endpoint_url` (no change when it is empty).

    Sets GMMC_S3_ENDPOINT_URL in this process's environment because the Ray worker process does not
    inherit the driver's environment (a local Ray keeps the environment it started with, other nodes
    have their own). DataLoader processes forked later inherit it. Credentials are not passed: each
    process finds them in the AWS_* variables, ~/.aws or an instance role of its node.
    """
    if endpoint_url:
        os.environ[storage.ENDPOINT_ENV_VAR] = endpoint_url


class WorkerRun:
    """State and steps of one worker's training run."""

    def __init__(self, config: Config, rank: int, world_size: int, shared_buffer: Any = None):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.shared_buffer = shared_buffer
        self.is_main = rank == 0
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    def log(self, message: str, *args: Any) -> None:
        if self.is_main:
            logger.info(message, *args)

    # ---- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        torch.manual_seed(cfg.train.seed + self.rank)
        self.device = ray.train.torch.get_device()

        # raw_model is the unwrapped module: sampling, evaluation and checkpoints use it.
        self.raw_model = build_model(cfg.model, cfg.model_family).to(self.device)
        self.model = ray.train.torch.prepare_model(self.raw_model)

        lr = cfg.optim.lr * (self.world_size if cfg.optim.lr_scaling == "linear" else 1)
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
        self.steps_per_epoch = len(self._train_loader(0))
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        self.sampler = build_sampler(cfg.sampler) if cfg.uses_sampling else None
        self.buffer = None
        if cfg.uses_sampling:
            self.buffer = build_buffer(
                cfg.buffer, cfg.model.num_classes, self.rank, self.world_size, self.device, cfg.train.seed,
                shared_handles=self.shared_buffer,
            )

        summary = model_summary(self.raw_model)
        self.log(
            "gmmc_dist %s: objective=%s model=WRN-%d-%d (d=%d, %.2fM parameters) workers=%d device=%s "
            "batch_per_worker=%d global_batch=%d lr=%.2e steps_per_epoch=%d epochs=%d buffer=%s",
            __version__, cfg.train.objective, cfg.model.depth, cfg.model.widen_factor, summary["feature_dim"],
            summary["parameters"] / 1e6, self.world_size, self.device, cfg.optim.batch_size_per_worker,
            cfg.optim.batch_size_per_worker * self.world_size, lr, self.steps_per_epoch, cfg.optim.epochs,
            f"{cfg.buffer.kind} capacity={cfg.buffer.capacity} (global)" if self.buffer else "none",
        )

    def _train_loader(self, epoch: int):
        cfg = self.config
        return make_train_loader(
            cfg.data.shards_url, cfg.data.train_split, cfg.optim.batch_size_per_worker, self.rank,
            self.world_size, cfg.data.loader_workers, cfg.train.seed, epoch, pad=cfg.data.pad,
            flip=cfg.data.flip, noise_std=cfg.data.noise_std, max_samples=cfg.data.max_train_samples or None,
        )

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over `warmup_iters` steps times x`decay_factor` per passed decay epoch."""
        optim = self.config.optim
        warmup = min(1.0, (step + 1) / optim.warmup_iters) if optim.warmup_iters else 1.0
        epoch = step // self.steps_per_epoch
        passed = sum(1 for milestone in optim.decay_epochs if epoch >= milestone)
        return warmup * optim.decay_factor**passed

    # ---- checkpoints -------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the latest checkpoint that Ray Train hands back for this run, if any."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            self.log("no checkpoint under %s: starting from step 0", storage.redact(self.config.run.output))
            return
        with latest.as_directory() as folder:
            state = checkpoint.load_payload(os.path.join(folder, checkpoint.STATE_FILE), self.device)
            saved_model = state["config"]["model"]
            if saved_model != self.config.to_dict()["model"] or state["family"] != self.raw_model.family:
                raise ValueError(
                    f"the checkpoint under {storage.redact(self.config.run.output)} was trained with model "
                    f"{state['family']} {saved_model}, not {self.raw_model.family} {self.config.to_dict()['model']}: "
                    "use another run.output or the checkpoint's model settings"
                )
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch = state["step"], state["epoch"]
            self.history = list(state.get("history", []))
            if self.buffer is not None and "buffer" in state:
                self.buffer.load_state_dict(self._buffer_state(folder, state["buffer"]))
        self.log("resuming from checkpoint %s at step %d (epoch %d of %d)", latest.path, self.step, self.epoch,
                 self.config.optim.epochs)

    def _buffer_state(self, folder: str, reference: dict) -> dict:
        if reference.get("kind") == "local":
            return checkpoint.load_payload(os.path.join(folder, f"buffer-rank{self.rank}.pt"), "cpu")
        return reference

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Report `metrics` with a checkpoint: rank 0 writes state.pt, every rank its local buffer."""
        with tempfile.TemporaryDirectory() as folder:
            buffer_reference = None
            if self.buffer is not None:
                buffer_reference = self._save_buffer(folder)
            if self.is_main:
                extra = {"history": self.history}
                if buffer_reference is not None:
                    extra["buffer"] = buffer_reference
                state = checkpoint.training_state(
                    self.raw_model, self.optimizer, self.scheduler, self.config, self.step, self.epoch, extra
                )
                checkpoint.write_local(folder, checkpoint.STATE_FILE, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def _save_buffer(self, folder: str) -> dict | None:
        """Save this rank's local buffer into the checkpoint, or snapshot the shared buffer once.

        The shared buffer's states stay in the run's storage; the checkpoint keeps the reference.
        """
        if self.config.buffer.kind == "local":
            payload = {"format": checkpoint.FORMAT_VERSION, **self.buffer.state_dict()}
            checkpoint.write_local(folder, f"buffer-rank{self.rank}.pt", payload)
            return {"kind": "local", "world_size": self.world_size}
        self.buffer.flush()  # every rank's write-backs land before rank 0 snapshots
        barrier()
        return self.buffer.snapshot(self.step) if self.is_main else None

    # ---- training ----------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.resume()
        epochs = self.config.optim.epochs
        while self.epoch < epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            metrics.update(self._maybe_evaluate())
            self.history.append(metrics)
            self._write_history()
            if self.epoch % self.config.train.checkpoint_every_epochs == 0 or self.epoch == epochs:
                self.save_checkpoint(metrics)
            else:
                ray.train.report(metrics)
        self.finish()

    def train_epoch(self) -> dict[str, float]:
        cfg = self.config
        torch.manual_seed(cfg.train.seed + 1009 * self.epoch + self.rank)
        self.model.train()
        device_sums = torch.zeros(len(_DEVICE_SUMS), dtype=torch.float64, device=self.device)
        host_sums = dict.fromkeys(_HOST_SUMS, 0.0)
        started = time.perf_counter()
        last_log = (started, self.step)
        for index, (images, labels) in enumerate(self._train_loader(self.epoch)):
            if index >= self.steps_per_epoch:
                break
            beta = beta_at(cfg.train, self.epoch + index / self.steps_per_epoch)
            terms = self.train_step(images.to(self.device), labels.to(self.device), beta)
            device_sums += torch.stack([terms.loss.detach(), terms.data_energy, terms.sample_energy,
                                        terms.correct.to(terms.loss.dtype)]).double()
            host_sums["images"] += len(labels)
            host_sums["sampled_batches"] += float(beta > 0)
            host_sums["beta"] += beta
            self.step += 1
            snapshot_every = cfg.buffer.snapshot_every_steps
            if self.buffer is not None and cfg.buffer.kind == "shared" and snapshot_every and self.is_main \
                    and self.step % snapshot_every == 0:
                self.buffer.snapshot(self.step)
            if self.step % cfg.train.log_every_steps == 0:
                last_log = self._log_progress(index, terms, last_log)
        host = torch.tensor([host_sums[key] for key in _HOST_SUMS], dtype=torch.float64, device=self.device)
        return self._epoch_metrics(torch.cat([device_sums, host]), time.perf_counter() - started)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, beta: float) -> LossTerms:
        """Run one optimiser step: draw chains, refine them with the sampler, write them back, update."""
        cfg = self.config
        samples = sample_labels = None
        if self.sampler is not None and beta > 0:
            conditioning = labels if cfg.sampler.labels == "data" else None
            draw = self.buffer.draw(len(labels), conditioning)
            samples = self.sampler.run(self.raw_model, draw.states, draw.labels)
            self.buffer.write_back(draw, samples)
            sample_labels = draw.labels

        if cfg.train.objective == "softmax":
            terms = softmax_loss(self.model, images, labels)
        elif cfg.train.objective == "jem":
            terms = jem_loss(self.model, images, labels, samples)
        else:
            terms = gmmc_loss(self.model, self.raw_model.means, images, labels, samples, sample_labels, beta)

        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return terms

    def _log_progress(self, index: int, terms: LossTerms, last_log: tuple[float, int]) -> tuple[float, int]:
        """Log one line (rank 0) and stop on divergence; the only host synchronisation in the epoch."""
        now = time.perf_counter()
        loss = float(terms.loss.detach())
        if not math.isfinite(loss) or abs(loss) > self.config.optim.max_abs_loss:
            raise FloatingPointError(
                f"training diverged at step {self.step}: loss {loss:.4g} exceeds optim.max_abs_loss="
                f"{self.config.optim.max_abs_loss:g}; lower optim.lr, sampler.step_size or train.beta"
            )
        images = (self.step - last_log[1]) * self.config.optim.batch_size_per_worker * self.world_size
        self.log(
            "epoch %d/%d step %d/%d loss %.4f data_energy %.4f sample_energy %.4f lr %.2e %.1f img/s",
            self.epoch + 1, self.config.optim.epochs, index + 1, self.steps_per_epoch, loss,
            float(terms.data_energy), float(terms.sample_energy), self.scheduler.get_last_lr()[0],
            images / max(now - last_log[0], 1e-9),
        )
        return now, self.step

    def _epoch_metrics(self, sums: torch.Tensor, seconds: float) -> dict[str, float]:
        all_reduce_sum(sums)
        totals = dict(zip(_DEVICE_SUMS + _HOST_SUMS, sums.tolist()))
        batches = self.steps_per_epoch * self.world_size
        metrics = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "loss": totals["loss"] / batches,
            "data_energy": totals["data_energy"] / batches,
            "sample_energy": totals["sample_energy"] / max(totals["sampled_batches"], 1),
            "train_accuracy": totals["correct"] / totals["images"],
            "beta": totals["beta"] / batches,
            "lr": self.scheduler.base_lrs[0] * self._lr_factor(self.step - 1),  # of the epoch's last step
            "images_per_second": totals["images"] / seconds,
            "epoch_seconds": seconds,
        }
        if self.buffer is not None:
            metrics.update({f"buffer_{key}": value for key, value in self.buffer.stats().items()})
        self.log("epoch %d done: %s", self.epoch + 1, json.dumps({k: round(v, 5) for k, v in metrics.items()}))
        return metrics

    def _maybe_evaluate(self) -> dict[str, float]:
        every = self.config.train.eval_every_epochs
        if not every or self.epoch % every or self.epoch == self.config.optim.epochs:
            return {}
        figures = self._evaluate()
        self.log("epoch %d test accuracy %.4f", self.epoch, figures["test_accuracy"])
        return {"test_accuracy": figures["test_accuracy"], "test_ece": figures["test_ece"]}

    def _evaluate(self) -> dict[str, float]:
        cfg = self.config
        figures = evaluate_test_split(
            self.raw_model, cfg.data.shards_url, cfg.data.test_split, cfg.train.eval_batch_size, self.rank,
            self.world_size, self.device,
        )
        self.raw_model.train()
        return figures

    def _write_history(self) -> None:
        if self.is_main:
            data = json.dumps(self.history, indent=2).encode()
            storage.write_bytes_atomic(storage.join(self.config.run.output, "history.json"), data)

    # ---- after training ----------------------------------------------------------------------

    def finish(self) -> None:
        """Estimate gamma^2, evaluate on the test split, write model.pt, metrics.json, samples.png."""
        cfg = self.config
        started = time.perf_counter()
        final: dict[str, Any] = {}
        if cfg.model_family == "gmmc":
            gamma2 = estimate_gamma2(
                self.raw_model, cfg.data.shards_url, cfg.data.train_split, cfg.train.eval_batch_size, self.rank,
                self.world_size, self.device, cfg.train.gamma_samples,
            )
            self.raw_model.set_gamma2(gamma2)
            final["gamma2"] = gamma2
            self.log("gamma^2 estimated from the training split: %.6f", gamma2)
        final.update(self._evaluate())
        self.log("test accuracy %.4f, ECE %.4f over %d images", final["test_accuracy"], final["test_ece"],
                 final["test_count"])

        if self.buffer is not None:
            states, labels = self.buffer.examples_per_class(per_class=10)
        if self.is_main:
            final.update(self._final_summary())
            output = cfg.run.output
            if self.buffer is not None:
                png = sample_grid_png(states, labels, cfg.model.num_classes, per_class=10)
                storage.write_bytes_atomic(storage.join(output, "samples.png"), png)
            checkpoint.save_model_file(storage.join(output, checkpoint.MODEL_FILE), self.raw_model, cfg, final)
            metrics_json = json.dumps({**final, "history": self.history}, indent=2)
            storage.write_bytes_atomic(storage.join(output, "metrics.json"), metrics_json.encode())
            self.log("wrote model.pt, metrics.json%s under %s in %.1f s",
                     ", samples.png" if self.buffer is not None else "", storage.redact(output),
                     time.perf_counter() - started)
        ray.train.report({k: v for k, v in final.items() if isinstance(v, (int, float))})

    def _final_summary(self) -> dict[str, Any]:
        cfg = self.config
        last = self.history[-1] if self.history else {}
        return {
            "objective": cfg.train.objective,
            "epochs": self.epoch,
            "steps": self.step,
            "num_workers": self.world_size,
            "global_batch_size": cfg.optim.batch_size_per_worker * self.world_size,
            "train_accuracy": last.get("train_accuracy"),
            "images_per_second": last.get("images_per_second"),
            "train_seconds": sum(entry.get("epoch_seconds", 0.0) for entry in self.history),
            "version": __version__,
        }
