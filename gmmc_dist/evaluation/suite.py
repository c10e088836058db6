"""The evaluation suite: load a checkpoint, run the named evaluations, write the results.

Output location (local folder or fsspec URL):
    evaluation.json   every figure, the options used, skipped evaluations with the reason
    report.md         the figures as tables with links to the PNGs
    *.png             reliability diagram, OOD histograms, t-SNE, sample grids

Evaluations (`EVALUATIONS`): accuracy and ece use the whole test set (or `test_limit` images);
ood, pgd, cw and tsne use its first `limit` images. fid and is need a local Inception-v3 weights
file and are skipped with an explanation when none is given. With `ray_workers` > 0 the
per-image work of accuracy, pgd and cw is split over that many Ray tasks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gmmc_dist import storage

from . import attacks, generative, ood, visual
from .calibration import DEFAULT_BINS, calibration_bin_sums, ece_from_bin_sums
from .inputs import check_image_batch, load_flat_folder, load_imagefolder_split, load_shards, map_batches

logger = logging.getLogger(__name__)

EVALUATIONS = ("accuracy", "ece", "ood", "pgd", "cw", "fid", "is", "tsne", "grids")
DEFAULT_EVALUATIONS = ("accuracy", "ece", "ood", "pgd", "tsne", "grids", "fid", "is")
_NEEDS_TEST_SET = {"accuracy", "ece", "ood", "pgd", "cw", "tsne"}
_NEEDS_GENERATED = {"fid", "is", "grids"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class EvaluationOptions:
    """Data locations and settings of the evaluations; the defaults are the GMMC paper's protocols."""

    test_folder: str | None = None
    """ImageFolder split of the in-distribution test set, e.g. cifar10/test."""
    test_shards: str | None = None
    """Webdataset shards (manifest.json) of the in-distribution set; used when test_folder is empty."""
    test_split: str = "test"
    test_limit: int = 0
    """Test images for accuracy and ECE (0: all)."""
    limit: int = 1000
    """Test images (and images per OOD set) for the expensive evaluations: ood, pgd, cw, tsne."""
    celeba: str | None = None
    """Flat folder of CelebA images of any size, resized to 32x32."""
    svhn_shards: str | None = None
    cifar100_shards: str | None = None
    interpolations: bool = True
    """Add CIFAR-10 interpolations (averages of random pairs of test images) to the OOD sets."""
    pgd_eps: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
    """L-inf radii in units of 1/255 on [0, 1] pixels (twice that on the model's [-1, 1] inputs)."""
    pgd_steps: int = 40
    pgd_step_size: float = 0.0
    """PGD step in units of 1/255 (0: 2.5 eps / steps)."""
    pgd_restarts: int = 1
    pgd_loss: str = "adaptive"
    cw_iterations: int = 100
    """Adam iterations per binary-search step of the untargeted C&W attack."""
    cw_targeted_iterations: int = 1000
    cw_binary_search_steps: int = 9
    cw_initial_const: float = 0.01
    cw_lr: float = 5e-3
    inception_weights: str | None = None
    fid_reference_folder: str | None = None
    """ImageFolder root whose every split forms the FID reference set (default: the parent of
    test_folder, i.e. CIFAR-10 train + test)."""
    fid_reference_stats: str | None = None
    """Local .npz cache of the reference mean and covariance (default: fid_reference.npz in a local output)."""
    fid_reference_limit: int = 0
    """Reference images to use (0: all)."""
    generated_count: int = 10_000
    """Generated images for FID and IS."""
    generated_source: str = "auto"
    """"buffer" (replay buffer of the training checkpoint), "sampler" (fresh chains) or "auto" (buffer if present)."""
    sampler_steps: int = 0
    """Steps of fresh chains (0: the checkpoint's sampler.steps)."""
    grid_per_class: int = 10
    batch_size: int = 128
    seed: int = 0
    ray_workers: int = 0
    class_names: tuple[str, ...] = field(default_factory=lambda: CIFAR10_CLASSES)

    def validate(self) -> None:
        for name in ("test_limit", "limit", "pgd_steps", "cw_iterations", "cw_targeted_iterations",
                     "fid_reference_limit", "sampler_steps", "ray_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"invalid {name}={getattr(self, name)}: it must be >= 0")
        for name in ("batch_size", "pgd_restarts", "cw_binary_search_steps", "generated_count", "grid_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name}={getattr(self, name)}: it must be >= 1")
        if self.pgd_loss not in attacks.PGD_LOSSES:
            raise ValueError(f"invalid pgd_loss {self.pgd_loss!r}: choose one of {', '.join(attacks.PGD_LOSSES)}")
        if self.generated_source not in ("auto", "buffer", "sampler"):
            raise ValueError(f"invalid generated_source {self.generated_source!r}: choose auto, buffer or sampler")
        if any(eps <= 0 or eps > 255 for eps in self.pgd_eps):
            raise ValueError(f"invalid pgd_eps {self.pgd_eps}: give radii in (0, 255] in units of 1/255")


class _Output:
    """Writes the result files under one local folder or fsspec URL and remembers the PNG names."""

    def __init__(self, url: str):
        storage.ensure_writable(url)
        self.url = url
        self.figures: list[str] = []

    def write(self, name: str, data: bytes) -> None:
        storage.write_bytes_atomic(storage.join(self.url, name), data)
        if name.endswith(".png"):
            self.figures.append(name)
        logger.info("wrote %s", storage.redact(storage.join(self.url, name)))


def run_evaluation(
    checkpoint_url: str,
    evaluations: list[str] | tuple[str, ...] | None,
    output_url: str,
    options: EvaluationOptions | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run `evaluations` (default `DEFAULT_EVALUATIONS`) on the model at `checkpoint_url`.

    Writes evaluation.json, report.md and PNGs under `output_url` and returns the JSON content.
    Inputs are checked (names, paths, output location, checkpoint) before any expensive work.
    """
    options = options or EvaluationOptions()
    options.validate()
    evaluations = list(evaluations or DEFAULT_EVALUATIONS)
    unknown = [name for name in evaluations if name not in EVALUATIONS]
    if unknown:
        raise ValueError(f"unknown evaluations {unknown}: choose from {', '.join(EVALUATIONS)}")
    _check_inputs(evaluations, options)
    output = _Output(output_url)

    from gmmc_dist.checkpoint import load_model

    logger.info("loading checkpoint %s", storage.redact(checkpoint_url))
    model, config = load_model(checkpoint_url, map_location=device)
    model.eval()
    results: dict[str, Any] = {
        "checkpoint": storage.redact(checkpoint_url),
        "family": model.family,
        "objective": config.train.objective,
        "model": asdict(config.model),
        "options": _jsonable(asdict(options)),
        "results": {},
        "skipped": {},
        "seconds": {},
    }
    context = _Context(model, config, options, device, checkpoint_url, output)
    for name in evaluations:
        started = time.perf_counter()
        logger.info("evaluation %s: start", name)
        try:
            outcome = _RUNNERS[name](context)
        except _Skipped as skipped:
            results["skipped"][name] = str(skipped)
            logger.warning("evaluation %s skipped: %s", name, skipped)
            continue
        results["results"][name] = outcome
        results["seconds"][name] = round(time.perf_counter() - started, 2)
        logger.info("evaluation %s: done in %.1f s", name, results["seconds"][name])
    results["figures"] = list(output.figures)
    output.write("evaluation.json", json.dumps(_jsonable(results), indent=2).encode())
    output.write("report.md", render_report(results).encode())
    return results


class _Skipped(Exception):
    """An evaluation that cannot run with the given inputs; the message names the missing input."""


def _check_inputs(evaluations: list[str], options: EvaluationOptions) -> None:
    if _NEEDS_TEST_SET & set(evaluations) and not (options.test_folder or options.test_shards):
        raise ValueError(
            f"evaluations {sorted(_NEEDS_TEST_SET & set(evaluations))} need a test set: pass --test-folder "
            "(an ImageFolder split such as cifar10/test) or --test-shards"
        )
    if options.test_folder and not Path(options.test_folder).is_dir():
        raise FileNotFoundError(f"test folder {options.test_folder} not found: give an ImageFolder split such as cifar10/test")
    if "ood" in evaluations and options.celeba and not Path(options.celeba).is_dir():
        raise FileNotFoundError(f"CelebA folder {options.celeba} not found: give the folder of CelebA .jpg files")
    if {"fid", "is"} & set(evaluations) and options.inception_weights:
        if not Path(options.inception_weights).is_file():
            raise FileNotFoundError(
                f"Inception weights file {options.inception_weights} not found. {generative.MISSING_WEIGHTS_HELP}"
            )
    if "fid" in evaluations and options.inception_weights and options.fid_reference_folder:
        if not Path(options.fid_reference_folder).is_dir():
            raise FileNotFoundError(
                f"FID reference folder {options.fid_reference_folder} not found: give an ImageFolder root such as cifar10"
            )


class _Context:
    """Loaded model, options and lazily loaded data shared by the evaluations of one run."""

    def __init__(self, model: nn.Module, config, options: EvaluationOptions, device: str, checkpoint_url: str, output: _Output):
        self.model = model
        self.config = config
        self.options = options
        self.device = device
        self.checkpoint_url = checkpoint_url
        self.output = output
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._probs: torch.Tensor | None = None
        self._generated: tuple[torch.Tensor, torch.Tensor, str] | None = None
        self._inception: generative.InceptionFeatures | None = None
        self._inception_outputs: tuple[np.ndarray, np.ndarray] | None = None

    # ---- data -----------------------------------------------------------------------------

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            limit = self.options.test_limit or None
            if self.options.test_folder:
                images, labels = load_imagefolder_split(self.options.test_folder, limit, self.options.seed)
            else:
                images, labels = load_shards(self.options.test_shards, self.options.test_split, limit)
            check_image_batch("test set", images)
            if int(labels.max()) >= self.model.num_classes:
                raise ValueError(
                    f"test labels reach {int(labels.max())} but the model has {self.model.num_classes} classes: "
                    "evaluate on the data set the model was trained on"
                )
            self._test = (images, labels)
            logger.info("test set: %d images", len(labels))
        return self._test

    def test_subset(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.test_set()
        if self.options.limit and self.options.limit < len(labels):
            # A seeded random subset, because an ImageFolder split is read in class order.
            generator = torch.Generator().manual_seed(self.options.seed)
            index = torch.randperm(len(labels), generator=generator)[: self.options.limit].sort().values
            return images[index], labels[index]
        return images, labels

    def probabilities(self) -> torch.Tensor:
        if self._probs is None:
            images, _ = self.test_set()
            logits = _parallel_map(self, "logits", images, None)
            self._probs = logits.softmax(dim=1)
        return self._probs

    def generated(self) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(images [N, 3, 32, 32], predicted or conditioning labels [N], description)."""
        if self._generated is None:
            self._generated = _generated_set(self)
        return self._generated

    def inception(self) -> generative.InceptionFeatures:
        if not self.options.inception_weights:
            raise _Skipped(generative.MISSING_WEIGHTS_HELP)
        if self._inception is None:
            self._inception = generative.load_inception(self.options.inception_weights, self.device)
        return self._inception

    def generated_inception_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        if self._inception_outputs is None:
            images, _, _ = self.generated()
            self._inception_outputs = generative.inception_outputs(
                self.inception(), images, batch_size=self.options.batch_size, device=self.device, name="generated set"
            )
        return self._inception_outputs


# ---- Ray ----------------------------------------------------------------------------------------


def _per_image_work(kind: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                    options: EvaluationOptions, device: str, seed: int) -> Any:
    """Run the per-image part of an evaluation on one slice of the test set (run locally or in a Ray task)."""
    if kind == "logits":
        model.eval()
        with torch.no_grad():
            return map_batches(model.logits, images, options.batch_size, device)
    if kind == "pgd":
        step = options.pgd_step_size / 255 if options.pgd_step_size else None
        return attacks.pgd_robust_flags(
            model, images, labels, [eps / 255 for eps in options.pgd_eps], options.pgd_steps, step,
            options.pgd_restarts, options.pgd_loss, options.batch_size, device, seed,
        )
    if kind == "cw":
        return attacks.cw_norms(
            model, images, labels, options.cw_iterations, options.cw_targeted_iterations,
            options.cw_binary_search_steps, options.cw_initial_const, options.cw_lr, 0.0,
            options.batch_size, device, seed,
        )
    raise ValueError(f"unknown per-image work {kind!r}")


def _merge(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _parallel_map(context: _Context, kind: str, images: torch.Tensor, labels: torch.Tensor | None) -> Any:
    """Run `_per_image_work` on the whole set, split into `ray_workers` Ray tasks when that is > 0.

    Each slice gets the seed `options.seed + its start index`, so random starts differ between slices.
    """
    options = context.options
    workers = min(options.ray_workers, len(images))
    if workers <= 1:
        return _per_image_work(kind, context.model, images, labels, options, context.device, options.seed)

    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    # NOTE: a CUDA device requests one whole GPU per task; on a single-GPU machine the tasks
    # then run one after another.
    num_gpus = 1 if str(context.device).startswith("cuda") else 0
    remote = ray.remote(num_cpus=1, num_gpus=num_gpus)(_per_image_work)
    model_reference = ray.put(context.model.cpu())
    bounds = np.linspace(0, len(images), workers + 1).astype(int)
    futures = [
        remote.remote(kind, model_reference, images[start:stop], None if labels is None else labels[start:stop],
                      options, context.device, options.seed + int(start))
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]
    logger.info("%s: %d images split over %d Ray tasks", kind, len(images), workers)
    parts = ray.get(futures)
    context.model.to(context.device)
    return _merge([_to_cpu(part) for part in parts])


def _to_cpu(part: Any) -> Any:
    if isinstance(part, torch.Tensor):
        return part.cpu()
    return {key: value.cpu() for key, value in part.items()}


# ---- evaluations ------------------------------------------------------------------------------


def _run_accuracy(context: _Context) -> dict:
    _, labels = context.test_set()
    correct = context.probabilities().argmax(dim=1) == labels
    return {"accuracy": float(correct.float().mean()), "count": len(labels)}


def _run_ece(context: _Context) -> dict:
    _, labels = context.test_set()
    probs = context.probabilities()
    sums = calibration_bin_sums(probs, labels, DEFAULT_BINS)
    context.output.write("reliability.png", visual.reliability_diagram_png(probs, labels, DEFAULT_BINS, context.model.family))
    return {"ece": ece_from_bin_sums(sums), "bins": DEFAULT_BINS, "count": len(labels), "figure": "reliability.png"}


def _ood_sets(context: _Context) -> dict[str, torch.Tensor]:
    options = context.options
    limit = options.limit or None
    images, _ = context.test_subset()
    sets: dict[str, torch.Tensor] = {}
    if options.svhn_shards:
        sets["svhn"] = load_shards(options.svhn_shards, "test", limit)[0]
    if options.cifar100_shards:
        sets["cifar100"] = load_shards(options.cifar100_shards, "test", limit)[0]
    if options.celeba:
        sets["celeba"] = load_flat_folder(options.celeba, limit, options.seed)
    if options.interpolations:
        sets["interpolation"] = ood.interpolation_set(context.test_set()[0], len(images), options.seed)
    return sets


def _run_ood(context: _Context) -> dict:
    sets = _ood_sets(context)
    if not sets:
        raise _Skipped("no OOD set given: pass --celeba, --svhn-shards or --cifar100-shards, or keep interpolations on")
    images, _ = context.test_subset()
    aurocs, raw = ood.evaluate_ood(context.model, images, sets, batch_size=context.options.batch_size, device=context.device)
    figures = {}
    for set_name, per_score in aurocs.items():
        for score, area in per_score.items():
            name = f"ood_{set_name}_{score}.png"
            context.output.write(name, ood.plot_score_histogram(raw["in_distribution"][score], raw[set_name][score], score, set_name, area))
            figures[f"{set_name}/{score}"] = name
    return {"auroc": aurocs, "counts": {name: len(value) for name, value in sets.items()},
            "in_distribution_count": len(images), "figures": figures}


def _run_pgd(context: _Context) -> dict:
    images, labels = context.test_subset()
    options = context.options
    flags = _parallel_map(context, "pgd", images, labels)
    return attacks.summarize_pgd(flags, context.model, options.pgd_loss, options.pgd_steps, options.pgd_restarts)


def _run_cw(context: _Context) -> dict:
    images, labels = context.test_subset()
    options = context.options
    norms = _parallel_map(context, "cw", images, labels)
    summary = attacks.summarize_cw(norms, options.cw_iterations, options.cw_targeted_iterations)
    summary.update(binary_search_steps=options.cw_binary_search_steps, initial_const=options.cw_initial_const,
                   lr=options.cw_lr, confidence=0.0)
    return summary


def _run_tsne(context: _Context) -> dict:
    images, labels = context.test_subset()
    context.model.eval()
    with torch.no_grad():
        features = map_batches(context.model.features, images, context.options.batch_size, context.device)
    embedding = visual.tsne_embedding(features.numpy(), seed=context.options.seed)
    names = list(context.options.class_names) if len(context.options.class_names) == context.model.num_classes else None
    context.output.write("tsne.png", visual.tsne_png(embedding, labels.numpy(), names, f"t-SNE of {context.model.family} test features"))
    return {"count": len(labels), "figure": "tsne.png"}


def _run_grids(context: _Context) -> dict:
    images, labels, source = context.generated()
    per_class = context.options.grid_per_class
    num_classes = context.model.num_classes
    context.output.write("samples.png", visual.class_rows_png(images, labels, num_classes, per_class))
    figures = {"samples": "samples.png"}
    if hasattr(context.model, "means"):
        closest, farthest = visual.closest_farthest_png(context.model, images, labels, per_class, context.device)
        context.output.write("samples_closest.png", closest)
        context.output.write("samples_farthest.png", farthest)
        figures.update(closest="samples_closest.png", farthest="samples_farthest.png")
    return {"source": source, "count": len(labels), "per_class": per_class, "figures": figures}


def _run_is(context: _Context) -> dict:
    _, probabilities = context.generated_inception_outputs()
    mean, std = generative.inception_score(probabilities, splits=10)
    return {"inception_score": mean, "std": std, "splits": 10, "count": len(probabilities),
            "inception": context.inception().kind, "source": context.generated()[2]}


def _run_fid(context: _Context) -> dict:
    extractor = context.inception()
    options = context.options
    reference_folder = options.fid_reference_folder or (str(Path(options.test_folder).parent) if options.test_folder else None)
    cache = options.fid_reference_stats
    if not cache and storage.is_local(context.output.url):
        cache = str(Path(context.output.url) / f"fid_reference_{extractor.kind}.npz")
    batches = _reference_batches(reference_folder, options) if reference_folder else None
    mu_reference, sigma_reference = generative.reference_statistics(extractor, batches, cache, context.device)
    features, _ = context.generated_inception_outputs()
    mu, sigma = generative.feature_statistics(features)
    return {"fid": generative.frechet_distance(mu, sigma, mu_reference, sigma_reference), "count": len(features),
            "reference": reference_folder or cache, "inception": extractor.kind, "source": context.generated()[2]}


def _reference_batches(folder: str, options: EvaluationOptions):
    """Stream every split of an ImageFolder root as [-1, 1] batches (up to fid_reference_limit images)."""
    from gmmc_dist.data.readers import ImageFolderSource

    from .inputs import uint8_to_model_scale

    source = ImageFolderSource(folder)
    remaining = options.fid_reference_limit or sum(source.count(split) for split in source.splits)
    logger.info("FID reference: %d images from %s (splits %s)", remaining, folder, list(source.splits))
    for split in source.splits:
        batch = []
        for image, _ in source.iter(split):
            if remaining == 0:
                break
            batch.append(image)
            remaining -= 1
            if len(batch) == options.batch_size:
                yield uint8_to_model_scale(np.stack(batch))
                batch = []
        if batch:
            yield uint8_to_model_scale(np.stack(batch))


_RUNNERS = {
    "accuracy": _run_accuracy, "ece": _run_ece, "ood": _run_ood, "pgd": _run_pgd, "cw": _run_cw,
    "fid": _run_fid, "is": _run_is, "tsne": _run_tsne, "grids": _run_grids,
}


# ---- generated set ------------------------------------------------------------------------------


def _generated_set(context: _Context) -> tuple[torch.Tensor, torch.Tensor, str]:
    options = context.options
    model = context.model
    num_classes = model.num_classes
    count = max(options.generated_count, num_classes * options.grid_per_class)
    states = None
    if options.generated_source in ("auto", "buffer"):
        states = load_buffer_states(context.checkpoint_url)
        if states is None and options.generated_source == "buffer":
            raise _Skipped(
                f"no replay buffer found with checkpoint {storage.redact(context.checkpoint_url)}: point --checkpoint "
                "at a run output or training checkpoint folder, or use --generated-source sampler"
            )
    if states is not None:
        images, labels, _ = generative.select_confident_samples(
            model, states, max(1, count // num_classes), options.batch_size, context.device
        )
        return images, labels, f"replay buffer ({len(states)} states, most confident per predicted class)"
    if model.family == "softmax":
        raise _Skipped("a softmax classifier has no sampler and no replay buffer to draw generated images from")
    sampler_config = context.config.sampler
    if options.sampler_steps:
        sampler_config = type(sampler_config)(**{**asdict(sampler_config), "steps": options.sampler_steps})
    images, _ = generative.sample_fresh(model, sampler_config, count, options.batch_size, context.device, options.seed)
    with torch.no_grad():
        predicted = map_batches(model.logits, images, options.batch_size, context.device).argmax(1)
    return images, predicted, f"fresh {sampler_config.name} chains from noise, {sampler_config.steps} steps"


def load_buffer_states(checkpoint_url: str) -> torch.Tensor | None:
    """Replay-buffer states [N, 3, 32, 32] saved with the training checkpoint nearest to `checkpoint_url`.

    Looks for `state.pt` in the folder itself (or the folder of a given file), else in the latest
    `*/checkpoint_*/` folder below it. Local buffers are the `buffer-rank<r>.pt` files beside
    `state.pt`; a shared buffer's states are stored in `state.pt` itself. Returns None when no
    buffer is found.
    """
    from gmmc_dist import checkpoint

    fs, path = storage.resolve(checkpoint_url)
    folder = path if fs.isdir(path) else path.rsplit("/", 1)[0]
    folder = folder.rstrip("/")
    state_path = f"{folder}/{checkpoint.STATE_FILE}"
    if not fs.isfile(state_path):
        candidates = sorted(fs.glob(f"{folder}/*/checkpoint_*/{checkpoint.STATE_FILE}"))
        if not candidates:
            return None
        state_path = candidates[-1]
    checkpoint_folder = state_path.rsplit("/", 1)[0]
    protocol = storage.protocol_of(checkpoint_url)
    to_url = (lambda p: p) if storage.is_local(checkpoint_url) else (lambda p: f"{protocol}://{p}")
    state = checkpoint.load_payload(to_url(state_path))
    reference = state.get("buffer")
    if not isinstance(reference, dict):
        return None
    if reference.get("kind") == "local":
        files = sorted(fs.glob(f"{checkpoint_folder}/buffer-rank*.pt"))
        if not files:
            return None
        logger.info("reading replay buffer from %d file(s) in %s", len(files), storage.redact(to_url(checkpoint_folder)))
        return torch.cat([checkpoint.load_payload(to_url(file))["states"].float() for file in files])
    if isinstance(reference.get("states"), torch.Tensor):
        return reference["states"].float()
    # NOTE: other layouts of a shared buffer's snapshot are not read; fresh sampling is used then.
    logger.warning("checkpoint %s has a buffer entry without states; no buffer samples used", storage.redact(to_url(state_path)))
    return None


# ---- report -------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def render_report(results: dict[str, Any]) -> str:
    """Markdown report of an `evaluation.json` content: tables of figures and links to the PNGs."""
    figures = results["results"]
    lines = [
        f"# Evaluation of {results['checkpoint']}",
        "",
        f"Model family `{results['family']}`, objective `{results['objective']}`, "
        f"WRN-{results['model']['depth']}-{results['model']['widen_factor']}.",
        "",
    ]
    if "accuracy" in figures:
        lines += ["## Accuracy", "", f"{_percent(figures['accuracy']['accuracy'])} on {figures['accuracy']['count']} test images.", ""]
    if "ece" in figures:
        ece = figures["ece"]
        lines += ["## Calibration", "", f"ECE {_percent(ece['ece'])} ({ece['bins']} bins, {ece['count']} images).", "",
                  f"![reliability diagram]({ece['figure']})", ""]
    if "ood" in figures:
        aurocs = figures["ood"]["auroc"]
        scores = list(next(iter(aurocs.values())))
        lines += ["## Out-of-distribution detection (AUROC, in-distribution = positive)", "",
                  "| set | images | " + " | ".join(scores) + " |", "|---|---|" + "---|" * len(scores)]
        for set_name, per_score in aurocs.items():
            cells = " | ".join(f"{per_score[score]:.3f}" for score in scores)
            lines.append(f"| {set_name} | {figures['ood']['counts'][set_name]} | {cells} |")
        lines += ["", "Histograms: " + ", ".join(f"[{key}]({name})" for key, name in figures["ood"]["figures"].items()), ""]
    if "pgd" in figures:
        pgd = figures["pgd"]
        lines += [f"## PGD-{pgd['steps']} L-inf (losses {', '.join(pgd['losses'])}, {pgd['restarts']} restart(s), {pgd['count']} images)",
                  "", "| eps ([0, 1] pixels) | clean | " + " | ".join(pgd["robust_accuracy"]) + " |",
                  "|---|---|" + "---|" * len(pgd["robust_accuracy"]),
                  "| robust accuracy | " + _percent(pgd["clean_accuracy"]) + " | "
                  + " | ".join(_percent(value) for value in pgd["robust_accuracy"].values()) + " |", ""]
    if "cw" in figures:
        cw = figures["cw"]
        lines += [f"## C&W L2 ({cw['attacked']} correctly classified of {cw['count']} images attacked; norms on [0, 1] pixels)", "",
                  "| mode | iterations | success rate | mean L2 of successes |", "|---|---|---|---|"]
        for mode in ("untargeted", "targeted"):
            if mode in cw:
                mean = cw[mode]["mean_l2"]
                lines.append(f"| {mode} | {cw[mode]['iterations']} | {_percent(cw[mode]['success_rate'])} | "
                             f"{'n/a' if mean is None else f'{mean:.3f}'} |")
        lines.append("")
    if "is" in figures or "fid" in figures:
        lines += ["## Sample quality", ""]
        if "is" in figures:
            lines.append(f"- IS {figures['is']['inception_score']:.2f} +- {figures['is']['std']:.2f} "
                         f"({figures['is']['count']} images, {figures['is']['inception']} Inception; {figures['is']['source']})")
        if "fid" in figures:
            lines.append(f"- FID {figures['fid']['fid']:.2f} ({figures['fid']['count']} images against {figures['fid']['reference']}, "
                         f"{figures['fid']['inception']} Inception; {figures['fid']['source']})")
        lines.append("")
    if "tsne" in figures:
        lines += ["## t-SNE of test features", "", f"![t-SNE]({figures['tsne']['figure']})", ""]
    if "grids" in figures:
        grids = figures["grids"]
        lines += ["## Samples", "", f"Source: {grids['source']}. One row per class.", ""]
        lines += [f"- {key}: ![{key}]({name})" for key, name in grids["figures"].items()] + [""]
    if results["skipped"]:
        lines += ["## Skipped", ""] + [f"- {name}: {reason}" for name, reason in results["skipped"].items()] + [""]
    lines += ["Run times (s): " + ", ".join(f"{name} {seconds}" for name, seconds in results["seconds"].items()), ""]
    return "\n".join(lines)
