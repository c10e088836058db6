"""Sample quality: Inception Score and Frechet Inception Distance from a local Inception-v3 file.

Libraries: the network is torchvision's Inception-v3 module. For the standard FID network, the
blocks that differ from torchvision's are replaced by the `FIDInception*` blocks of the
`pytorch-fid` package (0.3.0), which match the TensorFlow graph of 2015-12-05 that FID and IS
were defined with. The matrix square root of FID is `scipy.linalg.sqrtm`.

Weights are never downloaded. Two local files are accepted, recognised by the shape of `fc.weight`:
- `pt_inception-2015-12-05-6726825d.pth`, pytorch-fid's conversion of the TensorFlow weights
  (1008 classes). This gives the standard FID and IS numbers.
- torchvision's ImageNet weights `inception_v3_google-0cc3c7bd.pth` (1000 classes). FID and IS
  computed with them are NOT comparable with published numbers.

Definitions:
    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))    (Heusel et al., NeurIPS 2017)
        on the 2048-dimensional pool features of 299x299 bilinear resizes of the images.
    IS  = exp(E_x KL(p(y|x) || p(y)))                              (Salimans et al., NeurIPS 2016)
        averaged over 10 splits; p(y|x) is the softmax of pool features times fc.weight without
        the bias, as in the reference TensorFlow code, over the 1008 outputs of the FID network.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
MISSING_WEIGHTS_HELP = (
    f"FID and IS need a local Inception-v3 weights file, normally {FID_WEIGHTS_NAME} (download it on a "
    f"machine with internet access from {FID_WEIGHTS_URL}) and pass its path with --inception-weights "
    "(or inception_weights= in run_evaluation). Nothing is downloaded automatically."
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def build_fid_inception() -> nn.Module:
    """Build the FID Inception-v3 architecture with random weights (no download): torchvision's
    module with the Mixed blocks replaced by pytorch-fid's `FIDInception*` blocks and 1008 classes."""
    from pytorch_fid import inception as fid

    network = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    network.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    network.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    network.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    network.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    network.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    network.Mixed_7b = fid.FIDInceptionE_1(1280)
    network.Mixed_7c = fid.FIDInceptionE_2(2048)
    return network


def build_torchvision_inception() -> nn.Module:
    """Build torchvision's ImageNet Inception-v3 architecture with random weights (no download)."""
    import torchvision

    return torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)


class InceptionFeatures(nn.Module):
    """Pool features [N, 2048] and class probabilities from images [N, 3, H, W] in [-1, 1].

    `kind` is "fid" (standard FID network) or "torchvision" (ImageNet weights, non-standard numbers).
    """

    def __init__(self, network: nn.Module, kind: str):
        super().__init__()
        if kind not in ("fid", "torchvision"):
            raise ValueError(f"unknown Inception kind {kind!r}: choose fid or torchvision")
        self.network = network.eval()
        self.kind = kind

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.network
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        if self.kind == "torchvision":
            # torchvision's weights expect ImageNet-normalised inputs of [0, 1] pixels.
            mean = x.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        for layer in (
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
            net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c,
        ):
            x = layer(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.kind == "fid":
            logits = pool @ net.fc.weight.T  # no bias, as the reference IS code
        else:
            logits = net.fc(pool)
        return pool, logits.softmax(dim=1)


def load_inception(weights_path: str | os.PathLike | None, device: torch.device | str = "cpu") -> InceptionFeatures:
    """Load a local Inception-v3 weights file (see the module docstring) with weights-only unpickling.

    Raises FileNotFoundError with the download hint when `weights_path` is empty or missing, and
    ValueError when the file is not one of the two accepted state dicts.
    """
    if not weights_path:
        raise FileNotFoundError(f"no Inception weights file given. {MISSING_WEIGHTS_HELP}")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} not found. {MISSING_WEIGHTS_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise ValueError(f"cannot read Inception weights {path}: {error}. {MISSING_WEIGHTS_HELP}") from error
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{path} is not an Inception-v3 state dict (no fc.weight entry). {MISSING_WEIGHTS_HELP}")
    classes = tuple(state["fc.weight"].shape)
    if classes == (1008, 2048):
        network, kind = build_fid_inception(), "fid"
    elif classes == (1000, 2048):
        network, kind = build_torchvision_inception(), "torchvision"
        logger.warning(
            "Inception weights %s are torchvision's ImageNet weights: FID and IS will differ from "
            "published numbers, which use %s", path, FID_WEIGHTS_NAME,
        )
    else:
        raise ValueError(f"{path} has fc.weight of shape {classes}, expected (1008, 2048) or (1000, 2048)")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"Inception weights {path} do not match the {kind} architecture: {error}") from error
    return InceptionFeatures(network, kind).to(device)


def inception_outputs(
    extractor: InceptionFeatures,
    images: Iterable[torch.Tensor] | torch.Tensor,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    name: str = "images",
) -> tuple[np.ndarray, np.ndarray]:
    """Pool features [N, 2048] float64 and probabilities [N, classes] for images in [-1, 1].

    `images` is a tensor [N, 3, H, W] or an iterable of such batches (to stream large sets).
    """
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size)) if isinstance(images, torch.Tensor) else images
    features, probabilities, done = [], [], 0
    for batch in batches:
        pool, probs = extractor(batch.to(device))
        features.append(pool.double().cpu().numpy())
        probabilities.append(probs.double().cpu().numpy())
        done += len(batch)
        if len(features) % 20 == 0:
            logger.info("Inception features of %s: %d images done", name, done)
    if not features:
        raise ValueError(f"no images given for Inception features of {name}")
    return np.concatenate(features), np.concatenate(probabilities)


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS mean and standard deviation over `splits` equal consecutive splits of p(y|x) [N, K]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) < splits:
        raise ValueError(
            f"Inception score needs probabilities [N, K] with N >= splits={splits}, got shape {probabilities.shape}"
        )
    scores = []
    for part in np.array_split(probabilities, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # KL(p(y|x) || p(y)) with 0 log 0 = 0.
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(np.where(marginal > 0, marginal, 1))), 0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and covariance [d, d] (unbiased, rows are samples) of a feature set."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature statistics need [N, d] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, offset: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) between two Gaussians (scipy.linalg.sqrtm).

    When S1 S2 is singular, sqrtm is retried on (S1 + offset I)(S2 + offset I). A small imaginary
    part from rounding is dropped; a large one raises ValueError.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"Frechet distance needs matching statistics, got means {mu1.shape}, {mu2.shape} and "
            f"covariances {sigma1.shape}, {sigma2.shape}"
        )
    difference = mu1 - mu2
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        logger.warning("FID: S1 S2 is singular; adding %g to the covariance diagonals", offset)
        identity = np.eye(len(mu1)) * offset
        root = linalg.sqrtm((sigma1 + identity) @ (sigma2 + identity))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary part {np.abs(root.imag).max():.3g}")
        root = root.real
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets [N1, d] and [N2, d]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def reference_statistics(
    extractor: InceptionFeatures,
    batches: Iterable[torch.Tensor] | None,
    cache_path: str | os.PathLike | None,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """FID reference mean and covariance, read from the `.npz` cache or computed from `batches`.

    The cache contains `mu`, `sigma` and `kind` (the Inception kind), and is read with
    `allow_pickle=False`. A cache written with another Inception kind is rejected.
    """
    if cache_path and Path(cache_path).is_file():
        with np.load(cache_path, allow_pickle=False) as cached:
            if str(cached["kind"]) != extractor.kind:
                raise ValueError(
                    f"FID reference cache {cache_path} was computed with the {cached['kind']} Inception, "
                    f"not {extractor.kind}: delete it or pass another --fid-reference-stats path"
                )
            logger.info("FID reference statistics read from %s", cache_path)
            return cached["mu"], cached["sigma"]
    if batches is None:
        raise FileNotFoundError(
            f"FID reference statistics {cache_path} not found and no reference images were given: "
            "pass --fid-reference-folder (an ImageFolder root, e.g. cifar10 with train/ and test/)"
        )
    features, _ = inception_outputs(extractor, batches, device=device, name="FID reference")
    mu, sigma = feature_statistics(features)
    if cache_path:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, mu=mu, sigma=sigma, kind=np.array(extractor.kind), count=np.array(len(features)))
        Path(cache_path).write_bytes(buffer.getvalue())
        logger.info("FID reference statistics of %d images cached in %s", len(features), cache_path)
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# Generated sets
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def select_confident_samples(
    model: nn.Module, states: torch.Tensor, per_class: int, batch_size: int = 256, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, for every predicted class, the `per_class` states of highest confidence max_y p(y|x).

    This is how the GMMC reference code draws the generated set from the replay buffer. Returns
    (states [M, 3, 32, 32], predicted classes [M], confidences [M]) ordered by class. A class
    predicted for fewer than `per_class` states contributes all of them.
    """
    model.eval()
    probabilities = torch.cat([
        model.logits(states[i:i + batch_size].to(device)).softmax(1).cpu() for i in range(0, len(states), batch_size)
    ])
    confidence, predicted = probabilities.max(dim=1)
    chosen = []
    for label in range(probabilities.shape[1]):
        members = (predicted == label).nonzero().flatten()
        chosen.append(members[confidence[members].argsort(descending=True)[:per_class]])
    index = torch.cat(chosen)
    return states[index], predicted[index], confidence[index]


def sample_fresh(
    model: nn.Module,
    sampler_config,
    count: int,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model's sampler from U(-1, 1) noise with labels cycling over the classes.

    Returns (samples [count, 3, 32, 32] on the CPU, conditioning labels [count]). The chains are not
    persistent, so for models trained with a replay buffer these samples are usually worse than the
    buffer's unless `sampler_config.steps` is raised well above the training value.
    """
    from gmmc_dist.samplers import build_sampler

    sampler = build_sampler(sampler_config)
    generator = torch.Generator().manual_seed(seed)
    num_classes = int(model.num_classes)
    labels = torch.arange(count) % num_classes
    samples = []
    for start in range(0, count, batch_size):
        y = labels[start:start + batch_size]
        x0 = torch.rand(len(y), 3, 32, 32, generator=generator) * 2 - 1
        samples.append(sampler.run(model, x0.to(device), y.to(device)).cpu())
        logger.info("sampling: %d/%d images (%s, %d steps)", start + len(y), count, sampler_config.name, sampler_config.steps)
    return torch.cat(samples).clamp(-1, 1), labels
