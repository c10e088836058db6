"""Train softmax, GMMC (Dis), GMMC (Gen) and JEM with one small CPU budget, evaluate them, compare.

Every model gets the same WRN backbone, training images, epochs, batch, learning rate and number of
Ray Train workers, and the two sampling models (GMMC (Gen) with staged sampling, JEM with SGLD) get
the same number of sampler steps. Each trained model then goes through `jobs/evaluate.py` (its
`main`, in this process): accuracy and ECE, OOD AUROC of log p(x), max p(y|x) and the gradient norm
against CelebA and CIFAR-10 interpolations, PGD L-inf with the adaptive loss and with cross-entropy,
and untargeted and targeted C&W L2.

    python benchmarks/compare_baselines.py --smoke --output runs/baselines-smoke
    python benchmarks/compare_baselines.py --output runs/baselines

Writes under --output one folder per model: the training run with its `metrics.json`, and one
`eval-*` folder per evaluation call. The comparison goes to `--json` and `--markdown`, by default
`benchmarks/baselines.{json,md}` (files under --output with --smoke). A rerun with the same --output and settings reuses every finished training
(`metrics.json` present) and evaluation (`evaluation.json` present) and redoes only what is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from gmmc_dist.config import build_config  # noqa: E402

logger = logging.getLogger("compare_baselines")

MODELS = ("softmax", "gmmc_dis", "gmmc_gen", "jem")
MODEL_TITLES = {"softmax": "Softmax", "gmmc_dis": "GMMC (Dis)", "gmmc_gen": "GMMC (Gen)", "jem": "JEM"}
PGD_EPS = (4, 8, 16, 32)
OOD_SETS = ("celeba", "interpolation")
OOD_SCORES = ("log_px", "max_prob", "grad_norm")
SCORE_TITLES = {"log_px": "log p(x)", "max_prob": "max p(y|x)", "grad_norm": "-‖∇x log p(x)‖"}


@dataclass
class Budget:
    """Settings shared by all four models, so that they compare at equal cost."""

    epochs: int = 2
    train_samples: int = 3_000
    """Training images per epoch (data.max_train_samples), the same for every model."""
    max_steps_per_epoch: int = 0
    """Cap on optimiser steps per epoch (train.max_steps_per_epoch). 0 makes a full pass over train_samples."""
    batch_per_worker: int = 64
    workers: int = 2
    lr: float = 1e-3
    warmup_iters: int = 10
    """Linear warm-up in optimiser steps. The learning rate does not decay afterwards."""
    sampler_steps: int = 5
    buffer_capacity: int = 10_000
    buffer_reinit: float = 0.05
    gamma_samples: int = 2_000
    seed: int = 0
    test_limit: int = 1_000
    """Test images for accuracy and ECE in jobs/evaluate.py (0: all 10,000)."""
    ood_limit: int = 200
    pgd_limit: int = 40
    pgd_steps: int = 10
    cw_limit: int = 50
    cw_iterations: int = 10
    cw_targeted_iterations: int = 10
    cw_binary_search_steps: int = 5


SMOKE_BUDGET = Budget(
    epochs=1, train_samples=512, max_steps_per_epoch=3, warmup_iters=2, sampler_steps=2, buffer_capacity=512,
    gamma_samples=256, test_limit=200, ood_limit=32, pgd_limit=16, pgd_steps=2, cw_limit=8, cw_iterations=2,
    cw_targeted_iterations=2, cw_binary_search_steps=1,
)


def model_overrides(name: str, budget: Budget, shards: str, output: str) -> dict[str, dict[str, Any]]:
    """Build one model's overrides of the `cifar10` preset (the GMMC paper's settings): the shared budget and its objective."""
    # A milestone at the last epoch's end is never reached: with so few steps the rate does not decay.
    decay_epochs = [budget.epochs]
    overrides: dict[str, dict[str, Any]] = {
        "model": {"depth": 10, "widen_factor": 2},
        "data": {"shards_url": shards, "max_train_samples": budget.train_samples, "loader_workers": 1},
        "optim": {"lr": budget.lr, "warmup_iters": budget.warmup_iters, "epochs": budget.epochs,
                  "decay_epochs": decay_epochs, "batch_size_per_worker": budget.batch_per_worker},
        "train": {"seed": budget.seed, "max_steps_per_epoch": budget.max_steps_per_epoch,
                  "gamma_samples": budget.gamma_samples, "log_every_steps": 20},
        "run": {"output": output, "num_workers": budget.workers, "torch_threads": 1, "cpus_per_worker": 1.0},
    }
    sampling = {"steps": budget.sampler_steps}
    buffer = {"capacity": budget.buffer_capacity, "reinit_prob": budget.buffer_reinit}
    if name == "softmax":
        overrides["train"]["objective"] = "softmax"
    elif name == "gmmc_dis":
        overrides["train"]["objective"] = "discriminative"
    elif name == "gmmc_gen":
        overrides["train"]["objective"] = "generative"
        overrides["sampler"] = {"name": "staged", **sampling}
        overrides["buffer"] = buffer
    elif name == "jem":
        # JEM's own SGLD settings (Grathwohl et al. 2020): step 1, noise 0.01.
        overrides["train"]["objective"] = "jem"
        overrides["sampler"] = {"name": "sgld", "step_size": 1.0, "noise_std": 0.01, **sampling}
        overrides["buffer"] = buffer
    else:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return overrides


def evaluation_calls(budget: Budget, data_root: Path) -> dict[str, list[str]]:
    """jobs/evaluate.py arguments per evaluation folder; each model's checkpoint and output are added later.

    PGD runs once per loss because `--pgd-loss` takes one value per call. The subsets are seeded
    random draws from the test split, and a smaller --limit picks a subset of a larger one.
    """
    common = ["--test-folder", str(data_root / "cifar10" / "test"), "--test-limit", str(budget.test_limit),
              "--seed", str(budget.seed)]
    pgd = ["--evals", "pgd", "--limit", str(budget.pgd_limit), "--pgd-steps", str(budget.pgd_steps),
           "--pgd-eps", ",".join(str(eps) for eps in PGD_EPS)]
    return {
        "eval-main": common + ["--evals", "accuracy,ece,ood", "--limit", str(budget.ood_limit),
                               "--celeba", str(data_root / "celeba")],
        "eval-pgd-adaptive": common + pgd + ["--pgd-loss", "adaptive"],
        "eval-pgd-ce": common + pgd + ["--pgd-loss", "ce"],
        "eval-cw": common + ["--evals", "cw", "--limit", str(budget.cw_limit),
                             "--cw-iterations", str(budget.cw_iterations),
                             "--cw-targeted-iterations", str(budget.cw_targeted_iterations),
                             "--cw-binary-search-steps", str(budget.cw_binary_search_steps)],
    }


# ---- running ------------------------------------------------------------------------------------


def load_evaluate_module():
    """Import jobs/evaluate.py (the jobs folder is not a package)."""
    spec = importlib.util.spec_from_file_location("gmmc_evaluate_job", REPO_ROOT / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_ray(budget: Budget) -> None:
    """Start a private local Ray instance, so that training never joins another job's cluster."""
    import ray

    if ray.is_initialized():
        return
    # One CPU per training worker plus headroom for Ray Train's own actors.
    ray.init(address="local", num_cpus=budget.workers + 2, include_dashboard=False,
             object_store_memory=1_000_000_000, log_to_driver=True)


def train_model(name: str, budget: Budget, shards: str, folder: Path) -> dict[str, Any]:
    """Train one model unless `folder/metrics.json` exists; return its training figures and wall time."""
    from gmmc_dist.train.driver import run_training

    metrics_path = folder / "metrics.json"
    record: dict[str, Any] = {"output": str(folder)}
    if metrics_path.exists():
        logger.info("%s: reusing the finished training in %s", name, folder)
        record["reused"] = True
    else:
        config = build_config("cifar10", model_overrides(name, budget, shards, str(folder)))
        start_ray(budget)
        logger.info("%s: training (objective %s) into %s", name, config.train.objective, folder)
        started = time.perf_counter()
        run_training(config)
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        (folder / "benchmark_train_wall_seconds.txt").write_text(f"{record['wall_seconds']}\n")
        record["reused"] = False
    wall_file = folder / "benchmark_train_wall_seconds.txt"
    if "wall_seconds" not in record and wall_file.exists():
        record["wall_seconds"] = float(wall_file.read_text())
    metrics = json.loads(metrics_path.read_text())
    record["metrics"] = {key: value for key, value in metrics.items() if key != "history"}
    record["history"] = metrics.get("history", [])
    return record


def evaluate_model(evaluate_module, name: str, folder: Path, calls: dict[str, list[str]]) -> dict[str, Any]:
    """Run each evaluation call on the model in `folder` unless an evaluation.json with the same options exists."""
    outcome: dict[str, Any] = {}
    for call_name, arguments in calls.items():
        output = folder / call_name
        result_path = output / "evaluation.json"
        entry: dict[str, Any] = {"output": str(output)}
        argv = ["--checkpoint", str(folder), "--output", str(output), *arguments]
        if not _finished_with_same_options(evaluate_module, result_path, argv):
            logger.info("%s: evaluate %s", name, " ".join(shlex.quote(a) for a in argv))
            started = time.perf_counter()
            try:
                evaluate_module.main(argv)
            except Exception as error:  # noqa: BLE001 - one failed evaluation must not stop the others
                logger.error("%s: evaluation %s failed: %s", name, call_name, error, exc_info=True)
                entry["error"] = f"{type(error).__name__}: {error}"
                outcome[call_name] = entry
                continue
            entry["wall_seconds"] = round(time.perf_counter() - started, 1)
            (output / "benchmark_wall_seconds.txt").write_text(f"{entry['wall_seconds']}\n")
        else:
            logger.info("%s: reusing %s", name, result_path)
            entry["reused"] = True
            wall_file = output / "benchmark_wall_seconds.txt"
            if wall_file.exists():
                entry["wall_seconds"] = float(wall_file.read_text())
        entry["evaluation"] = json.loads(result_path.read_text())
        outcome[call_name] = entry
    return outcome


def _finished_with_same_options(evaluate_module, result_path: Path, argv: list[str]) -> bool:
    """Tell whether `result_path` exists and was written with the options that `argv` gives now."""
    if not result_path.exists():
        return False
    options = asdict(evaluate_module.options_from_args(evaluate_module.parse_args(argv)))
    # evaluation.json stores the options through JSON, so tuples come back as lists.
    previous = json.loads(result_path.read_text()).get("options")
    if previous != json.loads(json.dumps(options)):
        logger.info("%s was written with other options: evaluating again", result_path)
        return False
    return True


def check_settings(output: Path, settings: dict[str, Any]) -> None:
    """Record the settings under `output`, or raise when an earlier run there trained with other settings.

    Only the training settings must match, because an evaluation whose options changed is rerun
    (see `evaluate_model`).
    """
    path = output / "settings.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if _training_settings(previous) != _training_settings(settings):
            raise SystemExit(
                f"{path} contains training settings that differ from this run's, so its models cannot be "
                "reused: rerun with the same training options or choose another --output"
            )
    else:
        output.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


TRAINING_FIELDS = ("epochs", "train_samples", "max_steps_per_epoch", "batch_per_worker", "workers", "lr",
                   "warmup_iters", "sampler_steps", "buffer_capacity", "buffer_reinit", "gamma_samples", "seed")
"""Budget fields that change a trained model; the other fields only change its evaluation."""


def _training_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {"budget": {key: settings["budget"].get(key) for key in TRAINING_FIELDS},
            "shards": settings["shards"], "smoke": settings["smoke"]}


# ---- figures ------------------------------------------------------------------------------------


def collect_figures(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Flatten every model's training and evaluation results into {metric key: value}."""
    figures: dict[str, dict[str, Any]] = {}
    for name, record in models.items():
        row: dict[str, Any] = {}
        metrics = record.get("train", {}).get("metrics", {})
        row["train_test_accuracy"] = metrics.get("test_accuracy")
        row["train_test_ece"] = metrics.get("test_ece")
        row["train_test_count"] = metrics.get("test_count")
        row["train_accuracy"] = metrics.get("train_accuracy")
        row["gamma2"] = metrics.get("gamma2")
        row["images_per_second"] = metrics.get("images_per_second")
        row["train_seconds"] = metrics.get("train_seconds")
        row["train_wall_seconds"] = record.get("train", {}).get("wall_seconds")
        evaluations = record.get("evaluation", {})
        main = _results(evaluations, "eval-main")
        if "accuracy" in main:
            row["accuracy"] = main["accuracy"]["accuracy"]
            row["accuracy_count"] = main["accuracy"]["count"]
        if "ece" in main:
            row["ece"] = main["ece"]["ece"]
        if "ood" in main:
            for set_name in OOD_SETS:
                for score in OOD_SCORES:
                    row[f"auroc_{set_name}_{score}"] = main["ood"]["auroc"].get(set_name, {}).get(score)
            row["ood_counts"] = main["ood"]["counts"]
        for loss in ("adaptive", "ce"):
            pgd = _results(evaluations, f"eval-pgd-{loss}").get("pgd")
            if pgd:
                row[f"pgd_{loss}_clean"] = pgd["clean_accuracy"]
                row[f"pgd_{loss}_losses"] = pgd["losses"]
                row["pgd_count"] = pgd["count"]
                for eps in PGD_EPS:
                    row[f"pgd_{loss}_{eps}"] = pgd["robust_accuracy"].get(f"{eps}/255")
        cw = _results(evaluations, "eval-cw").get("cw")
        if cw:
            row["cw_count"] = cw["count"]
            row["cw_attacked"] = cw["attacked"]
            for mode in ("untargeted", "targeted"):
                if mode in cw:
                    row[f"cw_{mode}_l2"] = cw[mode]["mean_l2"]
                    row[f"cw_{mode}_success"] = cw[mode]["success_rate"]
        row["eval_wall_seconds"] = sum(entry.get("wall_seconds", 0.0) for entry in evaluations.values()) or None
        row["errors"] = [f"training: {record['train_error']}"] if record.get("train_error") else []
        row["errors"] += [f"{call}: {entry['error']}" for call, entry in evaluations.items() if "error" in entry]
        figures[name] = row
    return figures


def _results(evaluations: dict[str, Any], call: str) -> dict[str, Any]:
    return evaluations.get(call, {}).get("evaluation", {}).get("results", {})


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def comparison_rows(figures: dict[str, dict[str, Any]], budget: Budget) -> list[tuple[str, list[str]]]:
    """Rows of the comparison table: (label, one cell per model)."""
    def row(label: str, key: str, render) -> tuple[str, list[str]]:
        return label, [render(figures[name].get(key)) for name in MODELS]

    rows = [
        row("Training accuracy, last epoch (%)", "train_accuracy", _pct),
        row("Test accuracy, whole split at end of training (%)", "train_test_accuracy", _pct),
        row("Test ECE, whole split at end of training (%)", "train_test_ece", _pct),
        row(f"Accuracy, jobs/evaluate.py (%)", "accuracy", _pct),
        row(f"ECE, 20 bins, jobs/evaluate.py (%)", "ece", _pct),
    ]
    for set_name in OOD_SETS:
        for score in OOD_SCORES:
            label = f"AUROC {'CelebA' if set_name == 'celeba' else 'interpolations'}, {SCORE_TITLES[score]}"
            rows.append(row(label, f"auroc_{set_name}_{score}", _num))
    rows.append(row("PGD clean accuracy on the attacked subset (%)", "pgd_adaptive_clean", _pct))
    for loss, title in (("adaptive", "adaptive loss"), ("ce", "cross-entropy")):
        for eps in PGD_EPS:
            rows.append(row(f"PGD-{budget.pgd_steps} {title}, eps {eps}/255 (%)", f"pgd_{loss}_{eps}", _pct))
    rows += [
        row("C&W untargeted, mean L2 of successes", "cw_untargeted_l2", _num),
        row("C&W untargeted, success rate (%)", "cw_untargeted_success", _pct),
        row("C&W targeted, mean L2 of successes", "cw_targeted_l2", _num),
        row("C&W targeted, success rate (%)", "cw_targeted_success", _pct),
        row("Training throughput, last epoch (images/s)", "images_per_second", lambda v: _num(v, 0)),
        row("Training time inside the epochs (s)", "train_seconds", _seconds),
        row("Training wall time, with Ray start, gamma^2 and the test pass (s)", "train_wall_seconds", _seconds),
        row("Evaluation wall time (s)", "eval_wall_seconds", _seconds),
    ]
    return rows


# ---- claims ---------------------------------------------------------------------------------------


def _standard_error(accuracy: float, count: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / count)


def claim_paragraphs(figures: dict[str, dict[str, Any]], budget: Budget) -> list[str]:
    """Write one paragraph per claim of the GMMC paper, stating whether the measured numbers agree."""
    softmax, gmmc = figures["softmax"], {name: figures[name] for name in ("gmmc_dis", "gmmc_gen")}
    paragraphs = []

    # Accuracy.
    parts = []
    reference = softmax.get("train_test_accuracy")
    for name, row in gmmc.items():
        value = row.get("train_test_accuracy")
        if value is None or reference is None:
            parts.append(f"{MODEL_TITLES[name]}: not measured.")
            continue
        error = math.hypot(_standard_error(value, row["train_test_count"]),
                           _standard_error(reference, softmax["train_test_count"]))
        verdict = "agrees" if value >= reference else "does not agree"
        parts.append(f"{MODEL_TITLES[name]} {_pct(value)} % against softmax {_pct(reference)} % "
                     f"(difference {100 * (value - reference):+.2f} points, standard error of the difference "
                     f"{100 * error:.2f} points): {verdict}.")
    paragraphs.append("**GMMC accuracy >= softmax** (paper, WRN-28-10: GMMC (Dis) 94.3 %, GMMC (Gen) 94.08 %, "
                      "softmax 93.6 %). Test accuracy on the whole 10,000-image test split. " + " ".join(parts))

    # Calibration.
    parts = []
    reference = softmax.get("train_test_ece")
    for name, row in gmmc.items():
        value = row.get("train_test_ece")
        if value is None or reference is None:
            parts.append(f"{MODEL_TITLES[name]}: not measured.")
            continue
        verdict = "agrees" if value < reference else "does not agree"
        parts.append(f"{MODEL_TITLES[name]} ECE {_pct(value)} % against softmax {_pct(reference)} %: {verdict}.")
    jem_ece = figures["jem"].get("train_test_ece")
    paragraphs.append("**GMMC is better calibrated (lower ECE)** (paper: GMMC (Gen) 1.33 % on CIFAR-10; on SVHN / "
                      "CIFAR-100 softmax 1.91 / 22.32 %, JEM 2.08 / 4.87 %, GMMC 0.93 / 7.80 %). ECE with 20 bins on "
                      "the whole test split. " + " ".join(parts)
                      + (f" JEM: {_pct(jem_ece)} %." if jem_ece is not None else ""))

    # OOD scores on CelebA.
    parts = []
    for name, row in gmmc.items():
        log_px, max_prob, grad = (row.get(f"auroc_celeba_{score}") for score in OOD_SCORES)
        if None in (log_px, max_prob, grad):
            parts.append(f"{MODEL_TITLES[name]}: not measured.")
            continue
        beats = [title for title, value in (("log p(x)", log_px), ("the gradient norm", grad)) if value > max_prob]
        verdict = ("agrees" if len(beats) == 2 else
                   f"agrees only for {beats[0]}" if beats else "does not agree")
        parts.append(f"{MODEL_TITLES[name]}: log p(x) {log_px:.3f}, max p(y|x) {max_prob:.3f}, gradient norm "
                     f"{grad:.3f}: {verdict}.")
    count = softmax.get("ood_counts", {}).get("celeba") or gmmc["gmmc_gen"].get("ood_counts", {}).get("celeba")
    paragraphs.append("**log p(x) and the gradient-norm score beat max p(y|x) on CelebA for GMMC** (paper, GMMC "
                      "(Gen): .86 / .31 / .87). AUROC with CIFAR-10 test images as positives, "
                      f"{budget.ood_limit} test images against {count if count is not None else '—'} CelebA images. "
                      + " ".join(parts))

    # PGD.
    parts = []
    for name, row in gmmc.items():
        values = [row.get(f"pgd_adaptive_{eps}") for eps in PGD_EPS]
        references = [softmax.get(f"pgd_adaptive_{eps}") for eps in PGD_EPS]
        if None in values or None in references:
            parts.append(f"{MODEL_TITLES[name]}: not measured.")
            continue
        pairs = ", ".join(f"{_pct(v)} vs {_pct(r)}" for v, r in zip(values, references))
        higher = sum(v > r for v, r in zip(values, references))
        far = all(v >= r + 0.10 for v, r in zip(values, references))
        if far:
            verdict = "agrees (at least 10 points above softmax at every radius)"
        elif higher == 0:
            verdict = "does not agree (not above softmax at any radius)"
        else:
            verdict = (f"does not agree (above softmax at {higher} of {len(PGD_EPS)} radii, but not by "
                       "10 points at every radius)")
        masked = [row.get(f"pgd_ce_{eps}") for eps in PGD_EPS]
        mask_note = ("" if None in masked else
                     f" With cross-entropy instead of the adaptive loss it keeps {', '.join(_pct(v) for v in masked)} %.")
        parts.append(f"{MODEL_TITLES[name]} against softmax at eps 4/8/16/32: {pairs} %: {verdict}.{mask_note}")
    paragraphs.append("**GMMC is far more robust to PGD than softmax** (paper, PGD-40: GMMC (Gen) "
                      "56.29 / 56.27 / 56.13 / 55.02 %, softmax 19.05 / 4.95 / 0.57 / 0.06 %). Robust accuracy under "
                      f"PGD-{budget.pgd_steps} L-inf with the adaptive loss (distance to the true class mean and logit "
                      f"margin for GMMC, margin for softmax and JEM) on {budget.pgd_limit} test images; a misclassified "
                      "clean image counts as not robust. Here \"far more\" is read as at least 10 points at every radius. "
                      + " ".join(parts))

    # C&W.
    parts = []
    for name, row in gmmc.items():
        cells = []
        verdicts = []
        for mode in ("untargeted", "targeted"):
            value, reference = row.get(f"cw_{mode}_l2"), softmax.get(f"cw_{mode}_l2")
            if value is None or reference is None:
                successes = [(title, r.get(f"cw_{mode}_success")) for title, r in
                             ((MODEL_TITLES[name], row), ("softmax", softmax))]
                reasons = [f"{title} not measured" if rate is None else f"no successful attack on {title}"
                           for title, rate, norm in ((t, rt, r.get(f"cw_{mode}_l2")) for (t, rt), r in
                                                     zip(successes, (row, softmax))) if norm is None]
                cells.append(f"{mode}: no norms to compare ({', '.join(reasons)})")
                continue
            cells.append(f"{mode} {value:.3f} vs {reference:.3f} (success {_pct(row.get(f'cw_{mode}_success'))} vs "
                         f"{_pct(softmax.get(f'cw_{mode}_success'))} %)")
            verdicts.append(value > reference)
        if not verdicts:
            verdict = "no comparison possible"
        elif all(verdicts) and len(verdicts) == 2:
            verdict = "agrees"
        else:
            verdict = "agrees in part" if any(verdicts) else "does not agree"
        parts.append(f"{MODEL_TITLES[name]} against softmax: {'; '.join(cells)}: {verdict}.")
    paragraphs.append("**C&W needs larger perturbations against GMMC** (paper, mean L2 untargeted / targeted: GMMC "
                      "(Gen) 1.686 / 1.546, softmax 0.205 / 0.331). Mean L2 norm on [0, 1] pixels of the successful "
                      f"perturbations, over the correctly classified images among {budget.cw_limit} test images. The "
                      "mean covers only successful attacks, so a model whose attacks fail more often is compared on "
                      "its easier images. " + " ".join(parts))
    return paragraphs


# ---- report -------------------------------------------------------------------------------------


def hardware_description() -> dict[str, Any]:
    import ray
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "gpu": "none", "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "platform": platform.platform()}


def render_markdown(report: dict[str, Any]) -> str:
    budget = Budget(**report["budget"])
    figures = report["figures"]
    lines = [
        "# Baseline comparison: softmax, GMMC (Dis), GMMC (Gen) and JEM on a small CPU budget",
        "",
        "Generated by `benchmarks/compare_baselines.py`" + (" in smoke mode (a few steps per model: the figures "
                                                            "only show that the pipeline runs)." if report["smoke"]
                                                            else "."),
        "",
        "```bash",
        report["command"],
        "```",
        "",
        *run_section(report),
        "## Caveat",
        "",
        f"Each model trains a WRN-10-2 for {budget.epochs} epoch(s) of {budget.train_samples:,} images "
        "on 2 CPU cores, minutes of compute. The paper trains a WRN-28-10 for 150 epochs of 50,000 images "
        "(PGD-40, C&W with 100 and 1000 iterations and 9 binary-search steps, OOD on whole test sets). "
        "These numbers say how the four objectives behave at the start of training under an equal small "
        "budget. They neither confirm nor refute the paper's figures. The evaluation subsets are small, so "
        "each figure carries sampling error (for an accuracy p on n images about sqrt(p (1 - p) / n)).",
        "",
        *near_chance_note(figures),
        "## Results",
        "",
        "| | " + " | ".join(MODEL_TITLES[name] for name in MODELS) + " |",
        "|---|" + "---|" * len(MODELS),
    ]
    for label, cells in comparison_rows(figures, budget):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "AUROC counts in-distribution test images as positives (0.5 is chance). PGD budgets and C&W norms are on "
        "[0, 1] pixels. The adaptive PGD loss is the distance to the true class mean and the logit margin for GMMC "
        "(an image is robust only if both attacks fail) and the logit margin for softmax and JEM.",
        "",
        *missing_wall_time_note(figures),
    ]
    errors = {name: row["errors"] for name, row in figures.items() if row.get("errors")}
    if errors:
        lines += ["## Failures", ""]
        for name, messages in errors.items():
            lines += [f"- {MODEL_TITLES[name]}: {message}" for message in messages]
        lines.append("")
    lines += ["## The paper's claims against these numbers", ""]
    for paragraph in claim_paragraphs(figures, budget):
        lines += [paragraph, ""]
    lines += settings_section(report)
    return "\n".join(lines)


def run_section(report: dict[str, Any]) -> list[str]:
    """Describe the hardware, the wall time and every invocation of the script on the output folder."""
    hardware = report["hardware"]
    return [
        f"Hardware: {hardware['cpu']}, {hardware['logical_cpus']} logical CPUs, no GPU; Python {hardware['python']}, "
        f"PyTorch {hardware['torch']}, Ray {hardware['ray']}. Other jobs shared these CPUs during parts of the "
        "run (see the load averages of the invocations). Wall times and throughputs therefore depend on when "
        "each part ran, and they are not comparable across models.",
        "",
        f"Wall time: {report['compute_seconds']:.0f} s of training and evaluation in all, summed over the models "
        "(the table gives each part). Invocations of the script on this output folder:",
        "",
        "| started (UTC) | wall time (s) | 1-min load average at start / end | trained | evaluated |",
        "|---|---|---|---|---|",
        *[f"| {item['started_utc']} | {item['wall_seconds']:.0f} | {item['load_average_start']} / "
          f"{item['load_average_end']} | {', '.join(item['trained']) or 'none'} | "
          f"{', '.join(item['evaluated']) or 'none'} |" for item in report["invocations"]],
        "",
        *unrecorded_note(report),
    ]


CHANCE_MARGIN = 0.05
"""Accuracy above 1/10 below which a model counts as near chance in the caveat."""


def near_chance_note(figures: dict[str, dict[str, Any]]) -> list[str]:
    """Name the models whose whole-split test accuracy is within CHANCE_MARGIN of 10 % (chance on CIFAR-10)."""
    near = [f"{MODEL_TITLES[name]} ({_pct(row['train_test_accuracy'])} %)" for name, row in figures.items()
            if row.get("train_test_accuracy") is not None and row["train_test_accuracy"] < 0.1 + CHANCE_MARGIN]
    if not near:
        return []
    return [f"Near chance (10 % on 10 classes) after this budget: {', '.join(near)}. Such a model has not yet "
            "learned to classify, so its calibration, OOD and robustness figures describe an untrained "
            "classifier, not the method.", ""]


def unrecorded_note(report: dict[str, Any]) -> list[str]:
    """Name the models that were trained or evaluated before invocations.json recorded the runs."""
    trained = {name for item in report["invocations"] for name in item["trained"]}
    evaluated = {name for item in report["invocations"] for name in item["evaluated"]}
    missing = [MODEL_TITLES[name] for name, row in report["figures"].items()
               if (row.get("train_wall_seconds") is not None and name not in trained)
               or (row.get("eval_wall_seconds") is not None and name not in evaluated)]
    if not missing:
        return []
    return [f"Parts of {', '.join(missing)} ran in an invocation before this record began; their wall times are "
            "in the table.", ""]


def missing_wall_time_note(figures: dict[str, dict[str, Any]]) -> list[str]:
    """Name the trained models whose training wall time was not written (the invocation stopped first)."""
    missing = [MODEL_TITLES[name] for name, row in figures.items()
               if row.get("train_test_accuracy") is not None and row.get("train_wall_seconds") is None]
    if not missing:
        return []
    return [f"Training wall time not recorded for {', '.join(missing)}: the invocation that trained it was stopped "
            "after the training finished but before the script wrote the time. The row \"Training time inside the "
            "epochs\" still gives its epochs' time.", ""]


def settings_section(report: dict[str, Any]) -> list[str]:
    budget = Budget(**report["budget"])
    steps = (f"at most {budget.max_steps_per_epoch} steps per epoch" if budget.max_steps_per_epoch
             else "a full pass per epoch")
    lines = [
        "## Settings",
        "",
        "Shared by all four models:",
        "",
        "- Backbone: WRN-10-2 without batch norm, LeakyReLU(0.2), feature dimension 128 "
        "(`model.depth=10, model.widen_factor=2`). GMMC uses fixed Max-Mahalanobis means with S = 10; softmax and "
        "JEM use a linear head.",
        f"- Data: the CIFAR-10 training split, {budget.train_samples:,} images per epoch "
        f"(`data.max_train_samples`), {steps}, {budget.epochs} epoch(s); training augmentation of the paper "
        "(reflect-pad 4, random crop, flip, N(0, 0.03^2) noise).",
        f"- Optimiser: Adam, lr {budget.lr:g} after a linear warm-up of {budget.warmup_iters} steps, "
        f"no decay, batch {budget.batch_per_worker} per worker, "
        f"{budget.workers} Ray Train workers (global batch {budget.batch_per_worker * budget.workers}), 1 torch "
        f"thread per worker, seed {budget.seed}.",
        f"- gamma^2 of GMMC estimated on {budget.gamma_samples:,} training images after training.",
        "",
        "Per model:",
        "",
        "- Softmax: `train.objective=softmax`, cross-entropy.",
        "- GMMC (Dis): `train.objective=discriminative`, center regression loss (Eq. 5).",
        f"- GMMC (Gen): `train.objective=generative`, beta 0.5, staged sampling (Eq. 8), {budget.sampler_steps} steps "
        f"per iteration, alpha 1, gamma_s 0.001, replay buffer {budget.buffer_capacity:,} states "
        f"(one per worker of {budget.buffer_capacity // budget.workers:,}), reinitialisation {budget.buffer_reinit:g}.",
        f"- JEM: `train.objective=jem`, SGLD with step 1 and noise 0.01, {budget.sampler_steps} steps per iteration, "
        f"the same buffer ({budget.buffer_capacity:,} states, reinitialisation {budget.buffer_reinit:g}).",
        "",
        "Evaluation (`jobs/evaluate.py`, single process, CPU), reduced from the paper's protocol to fit the budget:",
        "",
        f"- Accuracy and ECE: {'all 10,000' if budget.test_limit == 0 else f'{budget.test_limit:,}'} test images "
        "read from the ImageFolder copy; the \"end of training\" rows come from the training run's own pass over "
        "the whole test split.",
        f"- OOD: {budget.ood_limit} test images against {budget.ood_limit} CelebA images (resized to 32x32) and "
        f"{budget.ood_limit} CIFAR-10 interpolations.",
        f"- PGD L-inf: {budget.pgd_steps} steps (the paper: 40), step 2.5 eps / steps, 1 random start, "
        f"eps {', '.join(str(e) for e in PGD_EPS)} /255, on {budget.pgd_limit} test images.",
        f"- C&W L2: {budget.cw_iterations} untargeted and {budget.cw_targeted_iterations} targeted Adam iterations "
        f"per binary-search step (the paper: 100 and 1000), binary-search steps: {budget.cw_binary_search_steps} "
        f"(the paper: 9), lr 5e-3, initial constant 0.01, confidence 0, on the correctly classified images among "
        f"{budget.cw_limit} test images; targets drawn uniformly among the other classes.",
        "",
        "Per-model folders under the output hold the training logs' figures (`metrics.json`, `history.json`), "
        "reliability diagrams and OOD histograms.",
        "",
    ]
    return lines


# ---- main ---------------------------------------------------------------------------------------


def run_models(models: list[str], budget: Budget, shards: str, output: Path, data_root: Path,
               records: dict[str, dict[str, Any]]) -> None:
    """Train every model in `models`, then evaluate each trained one, filling `records` as they finish."""
    for name in models:
        try:
            records[name]["train"] = train_model(name, budget, shards, output / name)
        except Exception as error:  # noqa: BLE001 - a diverged or failed model must not stop the others
            logger.error("%s: training failed: %s", name, error, exc_info=True)
            records[name]["train_error"] = f"{type(error).__name__}: {error}"
            records[name]["train_traceback"] = traceback.format_exc()

    import ray

    if ray.is_initialized():
        # Ray's idle processes would take CPU from the evaluations.
        ray.shutdown()
    # Ray Train 2.60's DataParallelTrainer.fit() leaves its SIGINT handler installed. After ray.shutdown()
    # that handler catches Ctrl-C, starts a new local Ray instance to abort the finished run and keeps
    # the process going. Python's default handler makes Ctrl-C stop the evaluations again.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    evaluate_module = load_evaluate_module()
    calls = evaluation_calls(budget, data_root)
    for name in models:
        if (output / name / "metrics.json").exists():
            records[name]["evaluation"] = evaluate_model(evaluate_module, name, output / name, calls)


def record_invocation(output: Path, models: list[str], records: dict[str, dict[str, Any]], started_utc: str,
                      started: float, load_start: float) -> list[dict[str, Any]]:
    """Append this invocation (time, load, what it trained and evaluated) to invocations.json; return the list."""
    path = output / "invocations.json"
    invocations = json.loads(path.read_text()) if path.exists() else []
    invocations.append({
        "started_utc": started_utc,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_start": round(load_start, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "trained": [name for name in models if records[name].get("train", {}).get("reused") is False],
        "evaluated": [name for name in models
                      if any("wall_seconds" in entry and not entry.get("reused")
                             for entry in records[name].get("evaluation", {}).values())],
    })
    path.write_text(json.dumps(invocations, indent=2))
    return invocations


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Budget()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/baselines", help="folder for the model runs and evaluations (default: %(default)s)")
    parser.add_argument("--shards", default="data/cifar10-shards", help="CIFAR-10 shards with manifest.json (default: %(default)s)")
    parser.add_argument("--data-root", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="folder holding cifar10/test and celeba (default: %(default)s)")
    parser.add_argument("--json", help="comparison JSON (default: benchmarks/baselines.json, or under --output with --smoke)")
    parser.add_argument("--markdown", help="comparison page (default: benchmarks/baselines.md, or under --output with --smoke)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s to run")
    parser.add_argument("--smoke", action="store_true", help="a few steps per model and tiny evaluation subsets, to check the pipeline")
    budget = parser.add_argument_group("budget (ignored with --smoke)")
    for name, value in asdict(defaults).items():
        budget.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"default: {value}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    budget = SMOKE_BUDGET if args.smoke else Budget(**{name: getattr(args, name) for name in asdict(Budget())})
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    output = Path(args.output).resolve()
    shards = str(Path(args.shards).resolve())
    data_root = Path(args.data_root).resolve()
    for required in (Path(shards) / "manifest.json", data_root / "cifar10" / "test", data_root / "celeba"):
        if not required.exists():
            raise SystemExit(f"{required} not found: build the shards with jobs/prepare_data.py or pass --shards / --data-root")
    # A smoke run never overwrites the published comparison in benchmarks/.
    report_folder = output if args.smoke else REPO_ROOT / "benchmarks"
    json_path = Path(args.json) if args.json else report_folder / "baselines.json"
    markdown_path = Path(args.markdown) if args.markdown else report_folder / "baselines.md"

    check_settings(output, {"budget": asdict(budget), "shards": shards, "data_root": str(data_root), "smoke": args.smoke})
    started = time.perf_counter()
    started_utc = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    load_start = os.getloadavg()[0]
    records: dict[str, dict[str, Any]] = {name: {} for name in MODELS}
    try:
        run_models(models, budget, shards, output, data_root, records)
    finally:
        # Recorded even when the run is interrupted, so that the page can list every invocation.
        invocations = record_invocation(output, models, records, started_utc, started, load_start)

    figures = collect_figures(records)
    compute_seconds = sum((row.get("train_wall_seconds") or 0) + (row.get("eval_wall_seconds") or 0)
                          for row in figures.values())
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "smoke": args.smoke,
        "budget": asdict(budget),
        "models": {name: model_overrides(name, budget, shards, str(output / name)) for name in MODELS},
        "evaluation_arguments": evaluation_calls(budget, data_root),
        "hardware": hardware_description(),
        "invocations": invocations,
        "compute_seconds": round(compute_seconds, 1),
        "figures": figures,
        "records": records,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    markdown_path.write_text(render_markdown(report))
    logger.info("wrote %s and %s; this invocation took %.0f s", json_path, markdown_path, invocations[-1]["wall_seconds"])
    return 1 if any(row["errors"] for name, row in figures.items() if name in models) else 0


if __name__ == "__main__":
    sys.exit(main())
