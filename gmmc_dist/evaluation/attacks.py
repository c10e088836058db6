"""White-box adversarial attacks: PGD L-inf (Madry et al., ICLR 2018) and C&W L2 (Carlini and
Wagner, IEEE S&P 2017), written against the model interface (`logits`, `features`, `means`).

Scales: models take inputs on [-1, 1]. Every budget and norm in this module's arguments and results
is on the [0, 1] pixel scale, as in the papers. An L-inf radius eps on [0, 1] is 2 eps on [-1, 1],
and an L2 norm on [-1, 1] is twice the [0, 1] norm.

PGD losses (maximised):
    ce        cross-entropy of the logits
    margin    max_{j != y} z_j - z_y, the logit margin (CW loss of Carlini and Wagner)
    distance  ||phi(x) - mu_y||^2, the squared distance to the true class mean (Max-Mahalanobis
              models only). Cross-entropy alone can mask gradients of MMC-type models and overstate
              robustness, which the distance and margin losses avoid.
    adaptive  distance and margin for GMMC (an image counts as robust only if both attacks fail),
              margin for softmax and JEM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PGD_LOSSES = ("adaptive", "margin", "distance", "ce")
DEFAULT_EPS = (4 / 255, 8 / 255, 16 / 255, 32 / 255)


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per example, [B]; positive exactly when the prediction is wrong."""
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.max(dim=1).values - true_logit


def attack_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example loss [B] that PGD maximises (see the module docstring for the names)."""
    if loss == "distance":
        if not hasattr(model, "means"):
            raise ValueError(
                f"PGD loss 'distance' needs a Max-Mahalanobis model with class means, got family "
                f"{getattr(model, 'family', '?')!r}: use --pgd-loss adaptive or ce"
            )
        return (model.features(x) - model.means[labels]).square().sum(dim=1)
    logits = model.logits(x)
    if loss == "margin":
        return margin_loss(logits, labels)
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    raise ValueError(f"unknown PGD loss {loss!r}: choose one of margin, distance, ce")


def resolve_pgd_losses(model: nn.Module, loss: str) -> tuple[str, ...]:
    """Return the concrete losses that `loss` means for this model ("adaptive" depends on the family)."""
    if loss not in PGD_LOSSES:
        raise ValueError(f"unknown PGD loss {loss!r}: choose one of {', '.join(PGD_LOSSES)}")
    if loss == "adaptive":
        return ("distance", "margin") if hasattr(model, "means") else ("margin",)
    return (loss,)


def _check_attack_inputs(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim < 2 or labels.shape != images.shape[:1]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match: expected [B, ...] and [B]")
    if float(images.min()) < -1 - 1e-5 or float(images.max()) > 1 + 1e-5:
        raise ValueError("attack inputs must lie in [-1, 1]: scale uint8 pixels p to p / 127.5 - 1")


def pgd_linf(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 40,
    step_size: float | None = None,
    restarts: int = 1,
    loss: str = "adaptive",
    random_start: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD L-inf with sign-gradient ascent, projection on the eps-ball and on the pixel range.

    eps and step_size are on the [0, 1] pixel scale; step_size defaults to 2.5 eps / steps (Madry
    et al.). Returns (adversarial images [B, ...] on [-1, 1], fooled [B] bool). Every loss of
    `resolve_pgd_losses(model, loss)` runs `restarts` times. An image's adversarial example comes
    from the first run that fools the model, or from the first run when none does.
    """
    _check_attack_inputs(images, labels)
    if eps < 0 or steps < 0 or restarts < 1:
        raise ValueError(f"invalid PGD settings eps={eps}, steps={steps}, restarts={restarts}: need eps >= 0, steps >= 0, restarts >= 1")
    radius = 2.0 * eps
    step = 2.0 * (2.5 * eps / max(steps, 1) if step_size is None else step_size)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    model.eval()

    best, fooled = None, None
    for loss_name in resolve_pgd_losses(model, loss):
        for _ in range(restarts):
            adversarial = _pgd_run(model, images, labels, radius, steps, step, loss_name, random_start, generator)
            with torch.no_grad():
                run_fooled = model.logits(adversarial).argmax(dim=1) != labels
            if best is None:
                best, fooled = adversarial, run_fooled
            else:
                newly = run_fooled & ~fooled
                best[newly] = adversarial[newly]
                fooled = fooled | run_fooled
    return best, fooled


def _pgd_run(model, images, labels, radius, steps, step, loss_name, random_start, generator) -> torch.Tensor:
    lower = (images - radius).clamp(min=-1.0)
    upper = (images + radius).clamp(max=1.0)
    adversarial = images.clone()
    if random_start:
        noise = torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1
        adversarial = torch.min(torch.max(images + radius * noise, lower), upper)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            objective = attack_loss(model, adversarial, labels, loss_name).sum()
            (grad,) = torch.autograd.grad(objective, inputs=adversarial)
        adversarial = torch.min(torch.max(adversarial.detach() + step * grad.sign(), lower), upper)
    return adversarial.detach()


def pgd_robust_flags(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps_values: Sequence[float] = DEFAULT_EPS,
    steps: int = 40,
    step_size: float | None = None,
    restarts: int = 1,
    loss: str = "adaptive",
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-image results of PGD L-inf: {"clean": correct [N] bool, "8/255": robust [N] bool, ...}.

    Radii in `eps_values` are on the [0, 1] pixel scale. An image is robust at a radius when it is
    classified correctly after every attack run, so a misclassified clean image is never robust.
    """
    resolve_pgd_losses(model, loss)
    model.eval()
    with torch.no_grad():
        flags = {"clean": torch.cat([
            model.logits(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size]
            for i in range(0, len(images), batch_size)
        ])}
    for eps in eps_values:
        robust = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            _, fooled = pgd_linf(model, x, y, eps, steps, step_size, restarts, loss, seed=seed + start)
            robust.append((~fooled).cpu())
        flags[eps_key(eps)] = torch.cat(robust)
        logger.info("PGD-%d eps %s: robust accuracy %.4f on %d images", steps, eps_key(eps), float(flags[eps_key(eps)].float().mean()), len(images))
    return flags


def eps_key(eps: float) -> str:
    """Name of an L-inf radius on the [0, 1] scale in units of 1/255, e.g. "8/255"."""
    return f"{round(eps * 255, 3):g}/255"


def summarize_pgd(flags: dict[str, torch.Tensor], model: nn.Module, loss: str, steps: int, restarts: int) -> dict:
    """{"clean_accuracy", "robust_accuracy": {"8/255": ...}, "losses", "steps", "restarts", "count"}."""
    return {
        "clean_accuracy": float(flags["clean"].float().mean()),
        "robust_accuracy": {key: float(value.float().mean()) for key, value in flags.items() if key != "clean"},
        "losses": list(resolve_pgd_losses(model, loss)),
        "steps": steps,
        "restarts": restarts,
        "count": len(flags["clean"]),
    }


def evaluate_pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_values: Sequence[float] = DEFAULT_EPS,
                 steps: int = 40, step_size: float | None = None, restarts: int = 1, loss: str = "adaptive",
                 batch_size: int = 128, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """Robust accuracy under PGD L-inf for every radius in `eps_values`; see `pgd_robust_flags`."""
    flags = pgd_robust_flags(model, images, labels, eps_values, steps, step_size, restarts, loss, batch_size, device, seed)
    return summarize_pgd(flags, model, loss, steps, restarts)


# ---------------------------------------------------------------------------------------------
# Carlini-Wagner L2
# ---------------------------------------------------------------------------------------------


def carlini_wagner_l2(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None = None,
    iterations: int = 100,
    binary_search_steps: int = 9,
    initial_const: float = 0.01,
    lr: float = 5e-3,
    confidence: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C&W L2 attack (Carlini and Wagner 2017), untargeted when `targets` is None.

    Minimises ||x' - x||_2^2 + c f(x') over x' = tanh(w) (which keeps x' in [-1, 1]) with Adam,
    where the distance is taken on the [0, 1] pixel scale and
        f = max(z_y - max_{j != y} z_j, -confidence)        untargeted
        f = max(max_{j != t} z_j - z_t, -confidence)        targeted at t.
    The constant c starts at `initial_const` and is set per image by binary search: it is
    multiplied by 10 while no success is found, and otherwise bisected between the largest failing
    and the smallest successful value.

    Returns (adversarial [B, ...] on [-1, 1], success [B] bool, L2 norms [B] on the [0, 1] scale,
    +inf where no success was found). An image's result is the successful x' of smallest L2 norm
    over all iterations and constants.
    """
    _check_attack_inputs(images, labels)
    if iterations < 1 or binary_search_steps < 1 or initial_const <= 0 or lr <= 0:
        raise ValueError(
            f"invalid C&W settings iterations={iterations}, binary_search_steps={binary_search_steps}, "
            f"initial_const={initial_const}, lr={lr}: all must be positive"
        )
    model.eval()
    batch = images.shape[0]
    device = images.device
    flat_dims = tuple(range(1, images.ndim))
    # atanh is infinite at +-1, so saturated pixels start just inside the range.
    w_start = torch.atanh(images.clamp(-1 + 1e-6, 1 - 1e-6))

    const = torch.full((batch,), initial_const, device=device)
    lower = torch.zeros(batch, device=device)
    upper = torch.full((batch,), float("inf"), device=device)
    best_norm = torch.full((batch,), float("inf"), device=device)
    best_adversarial = images.clone()

    for _ in range(binary_search_steps):
        w = w_start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=lr)
        succeeded_now = torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(iterations):
            with torch.enable_grad():
                candidate = torch.tanh(w)
                squared = ((candidate - images) / 2).square().sum(dim=flat_dims)
                logits = model.logits(candidate)
                gap = _cw_gap(logits, labels, targets)
                objective = (squared + const * (gap + confidence).clamp(min=0)).sum()
                optimizer.zero_grad()
                objective.backward()
            optimizer.step()

            with torch.no_grad():
                success = (gap + confidence) < 0
                norm = squared.sqrt()
                improved = success & (norm < best_norm)
                best_norm = torch.where(improved, norm, best_norm)
                best_adversarial[improved] = candidate.detach()[improved]
                succeeded_now |= success

        upper = torch.where(succeeded_now, torch.minimum(upper, const), upper)
        lower = torch.where(succeeded_now, lower, torch.maximum(lower, const))
        const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
    return best_adversarial, torch.isfinite(best_norm), best_norm


def _cw_gap(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """z_y - max_{j != y} z_j (untargeted) or max_{j != t} z_j - z_t (targeted); negative on success."""
    if targets is None:
        return -margin_loss(logits, labels)
    return margin_loss(logits, targets)


def random_targets(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Draw a target class different from the label for every image, uniform over the others, seeded."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + offsets) % num_classes


def cw_norms(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    untargeted_iterations: int = 100,
    targeted_iterations: int = 1000,
    binary_search_steps: int = 9,
    initial_const: float = 0.01,
    lr: float = 5e-3,
    confidence: float = 0.0,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-image C&W L2 norms on the [0, 1] scale: {"correct": [N] bool, "untargeted": [N],
    "targeted": [N]}, with +inf where the attack failed and NaN for images not attacked.

    Only correctly classified images are attacked, because a misclassified image needs no
    perturbation. Targets are drawn uniformly among the other classes, seeded by `seed` and the
    image's position, so splitting the set over workers does not change them.
    """
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([
            model.logits(images[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)
        ])
    correct = predictions == labels
    results = {"correct": correct}
    num_classes = int(model.num_classes)
    for mode, iterations in (("untargeted", untargeted_iterations), ("targeted", targeted_iterations)):
        norms = torch.full((len(images),), float("nan"))
        if iterations <= 0:
            results[mode] = norms
            continue
        for start in range(0, len(images), batch_size):
            chosen = correct[start:start + batch_size].nonzero().flatten() + start
            if len(chosen) == 0:
                continue
            x, y = images[chosen].to(device), labels[chosen].to(device)
            t = random_targets(labels[chosen], num_classes, seed + start).to(device) if mode == "targeted" else None
            _, _, norm = carlini_wagner_l2(model, x, y, t, iterations, binary_search_steps, initial_const, lr, confidence)
            norms[chosen] = norm.cpu()
            logger.info("C&W %s: %d/%d images done", mode, min(start + batch_size, len(images)), len(images))
        results[mode] = norms
    return results


def summarize_cw(norms: dict[str, torch.Tensor], untargeted_iterations: int, targeted_iterations: int) -> dict:
    """Success rate and mean L2 norm ([0, 1] pixel scale) of the successful perturbations per mode."""
    correct = norms["correct"]
    summary: dict = {"count": len(correct), "attacked": int(correct.sum()), "norm_scale": "L2 on [0, 1] pixels"}
    for mode, iterations in (("untargeted", untargeted_iterations), ("targeted", targeted_iterations)):
        if iterations <= 0 or not bool(correct.any()):
            continue
        attacked = norms[mode][correct]
        success = torch.isfinite(attacked)
        summary[mode] = {
            "iterations": iterations,
            "success_rate": float(success.float().mean()),
            "mean_l2": float(attacked[success].mean()) if bool(success.any()) else None,
        }
        logger.info("C&W %s: success rate %.3f, mean L2 %s", mode, summary[mode]["success_rate"], summary[mode]["mean_l2"])
    return summary


def evaluate_cw(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, untargeted_iterations: int = 100,
                targeted_iterations: int = 1000, binary_search_steps: int = 9, initial_const: float = 0.01,
                lr: float = 5e-3, confidence: float = 0.0, batch_size: int = 128,
                device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """C&W L2 success rates and mean norms of successful perturbations; see `cw_norms`."""
    norms = cw_norms(model, images, labels, untargeted_iterations, targeted_iterations, binary_search_steps,
                     initial_const, lr, confidence, batch_size, device, seed)
    return summarize_cw(norms, untargeted_iterations, targeted_iterations)
