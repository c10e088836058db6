"""Evaluation suite: metrics against hand-computed values, attacks against closed-form optima on
linear models, FID/IS against direct computations, and end-to-end runs on tiny checkpoints with
real CIFAR-10 and CelebA images."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gmmc_dist.checkpoint import save_model_file
from gmmc_dist.config import build_config
from gmmc_dist.evaluation import attacks, generative, ood
from gmmc_dist.evaluation.calibration import expected_calibration_error
from gmmc_dist.evaluation.inputs import load_flat_folder, load_imagefolder_split
from gmmc_dist.evaluation.suite import EvaluationOptions, load_buffer_states, run_evaluation
from gmmc_dist.models import build_model


class LinearTwoClass(nn.Module):
    """Logits [w.x + b, 0]: class 0 wins exactly when w.x + b > 0. `b` may hold one bias per image."""

    family = "softmax"
    num_classes = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | float):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        score = (x.flatten(1) * self.weight.flatten()).sum(dim=1) + self.bias
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def tiny_config(objective: str):
    sampler = {"sampler": {"name": "staged"}} if objective in ("generative", "joint") else {}
    return build_config("tiny", {"train": {"objective": objective}, **sampler})


@pytest.fixture(scope="module")
def tiny_gmmc_file(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config("generative")
    model = build_model(config.model, "gmmc")
    path = tmp_path_factory.mktemp("checkpoints") / "model.pt"
    save_model_file(str(path), model, config)
    return path


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """The FID Inception-v3 architecture with random weights (the real weights are not on this machine)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    torch.save(generative.build_fid_inception().state_dict(), path)
    return path


# ---- calibration and AUROC --------------------------------------------------------------------


def test_ece_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # Bins: {0.9, 0.9} accuracy 0.5 -> 2/4 * 0.4; {0.6} accuracy 1 -> 1/4 * 0.4; {0.7} -> 1/4 * 0.3.
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2 + 0.1 + 0.075)


def test_auroc_hand_computed():
    # 3 of the 4 (in, out) pairs are ordered correctly.
    assert ood.auroc(np.array([0.8, 0.4]), np.array([0.5, 0.1])) == pytest.approx(0.75)
    assert ood.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    # A tie counts one half.
    assert ood.auroc(np.array([0.5]), np.array([0.5])) == 0.5


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="non-empty"):
        ood.auroc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        ood.auroc(np.array([np.nan]), np.array([1.0]))


def test_interpolations_average_distinct_pairs():
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 32, 32).contiguous()
    mixed = ood.interpolation_set(images, count=200, seed=3)
    assert mixed.shape == (200, 3, 32, 32)
    values = mixed[:, 0, 0, 0]
    pair_means = {round((a + b) / 2, 4) for a in images[:, 0, 0, 0].tolist() for b in images[:, 0, 0, 0].tolist() if a != b}
    assert {round(v, 4) for v in values.tolist()} <= pair_means
    assert torch.equal(mixed, ood.interpolation_set(images, count=200, seed=3))


def test_ood_rejects_wrong_image_size():
    model = build_model(tiny_config("generative").model, "gmmc")
    in_distribution = torch.zeros(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"celeba.*\(4, 3, 64, 64\).*32x32"):
        ood.evaluate_ood(model, in_distribution, {"celeba": torch.zeros(4, 3, 64, 64)})


def test_ood_scores_of_tiny_model(data_root):
    torch.manual_seed(0)
    model = build_model(tiny_config("generative").model, "gmmc").eval()
    images, _ = load_imagefolder_split(data_root / "cifar10" / "test", limit=6)
    scores = ood.compute_scores(model, images)
    assert set(scores) == {"log_px", "max_prob", "grad_norm"}
    assert np.allclose(scores["log_px"], model.log_px(images).detach().numpy(), atol=1e-5)
    assert ((scores["max_prob"] > 0) & (scores["max_prob"] <= 1)).all()
    assert (scores["grad_norm"] < 0).all()


# ---- PGD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_pgd_reaches_linear_optimum(loss):
    torch.manual_seed(0)
    weight = 0.2 * torch.randn(3, 4, 4)
    images = torch.rand(5, 3, 4, 4) * 2 - 1  # values near +-1 make the pixel-range clip matter
    # A small score keeps softmax away from saturation, where float32 cross-entropy gradients are 0.
    model = LinearTwoClass(weight, 0.0)
    labels = torch.zeros(5, dtype=torch.long)
    eps = 8 / 255
    adversarial, _ = attacks.pgd_linf(model, images, labels, eps, steps=40, loss=loss)
    # Both losses increase as w.x decreases, so the L-inf optimum is the clipped corner of the ball.
    optimum = (images - 2 * eps * weight.sign()).clamp(-1, 1)
    assert torch.allclose(adversarial, optimum, atol=1e-6)


def test_pgd_stays_in_eps_ball_and_range(data_root):
    torch.manual_seed(0)
    model = build_model(tiny_config("generative").model, "gmmc").eval()
    images, labels = load_imagefolder_split(data_root / "cifar10" / "test", limit=4)
    for eps in (4 / 255, 32 / 255):
        adversarial, _ = attacks.pgd_linf(model, images, labels, eps, steps=3, loss="adaptive")
        assert (adversarial - images).abs().max() <= 2 * eps + 1e-6
        assert adversarial.min() >= -1
        assert adversarial.max() <= 1


def test_pgd_distance_loss_needs_means():
    model = LinearTwoClass(torch.ones(3, 4, 4), 0.0)
    with pytest.raises(ValueError, match="class means"):
        attacks.pgd_linf(model, torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), 0.01, steps=1, loss="distance")
    assert attacks.resolve_pgd_losses(model, "adaptive") == ("margin",)


# ---- C&W ----------------------------------------------------------------------------------------


def test_cw_matches_linear_minimum_distance():
    torch.manual_seed(0)
    weight = torch.randn(48)
    images = torch.rand(6, 48) - 0.5
    # Bias per image so the decision boundary w.x + b = 0 lies at L2 distance d on [-1, 1].
    distances = torch.linspace(0.1, 0.5, 6)
    bias = -(images @ weight) + distances * weight.norm()
    model = LinearTwoClass(weight, bias)
    labels = torch.zeros(6, dtype=torch.long)
    _, success, norms = attacks.carlini_wagner_l2(model, images, labels, iterations=100)
    expected = distances / 2  # the closed form |w.x + b| / ||w||, converted to the [0, 1] pixel scale
    assert success.all()
    assert (norms >= expected * (1 - 1e-4)).all()
    assert (norms <= expected * 1.03).all()


def test_cw_targeted_on_two_classes_hits_target():
    torch.manual_seed(1)
    weight = torch.randn(12)
    images = torch.rand(3, 12) - 0.5
    model = LinearTwoClass(weight, -(images @ weight) + 0.2 * weight.norm())
    labels = torch.zeros(3, dtype=torch.long)
    adversarial, success, norms = attacks.carlini_wagner_l2(
        model, images, labels, targets=torch.ones(3, dtype=torch.long), iterations=100, binary_search_steps=5
    )
    assert success.all()
    assert (model.logits(adversarial).argmax(1) == 1).all()
    assert norms.max() <= 0.1 * 1.05


def test_cw_summary_counts_only_correct_images():
    norms = {
        "correct": torch.tensor([True, True, False, True]),
        "untargeted": torch.tensor([0.5, float("inf"), float("nan"), 1.5]),
        "targeted": torch.tensor([1.0, 2.0, float("nan"), float("inf")]),
    }
    summary = attacks.summarize_cw(norms, 100, 1000)
    assert summary["attacked"] == 3
    assert summary["untargeted"]["success_rate"] == pytest.approx(2 / 3)
    assert summary["untargeted"]["mean_l2"] == pytest.approx(1.0)
    assert summary["targeted"]["mean_l2"] == pytest.approx(1.5)


# ---- FID and IS ---------------------------------------------------------------------------------


def test_frechet_distance_one_dimensional():
    # (0 - 1)^2 + 1 + 4 - 2 sqrt(1 * 4) = 2
    assert generative.frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)


def test_fid_of_gaussian_features_matches_direct_formula():
    rng = np.random.default_rng(0)
    first = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    second = rng.normal(loc=0.5, size=(400, 6)) @ rng.normal(size=(6, 6))
    mu1, mu2 = first.mean(0), second.mean(0)
    sigma1, sigma2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    # Tr((S1 S2)^(1/2)) is the sum of the square roots of the (real, positive) eigenvalues of S1 S2.
    trace_root = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real).sum()
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    assert generative.fid_from_features(first, second) == pytest.approx(direct, rel=1e-8)
    assert generative.fid_from_features(first, first) == pytest.approx(0.0, abs=1e-6)


def test_inception_score_hand_computed():
    one_hot = np.eye(5)[np.arange(50) % 5]  # every split contains each of the 5 classes once
    mean, std = generative.inception_score(one_hot, splits=10)
    assert mean == pytest.approx(5.0)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert generative.inception_score(np.full((20, 4), 0.25), splits=10)[0] == pytest.approx(1.0)


def test_inception_loads_local_file(random_inception_file, data_root):
    extractor = generative.load_inception(random_inception_file)
    assert extractor.kind == "fid"
    images, _ = load_imagefolder_split(data_root / "cifar10" / "test", limit=2)
    features, probabilities = generative.inception_outputs(extractor, images)
    assert features.shape == (2, 2048)
    assert probabilities.shape == (2, 1008)
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_inception_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth not found.*--inception-weights"):
        generative.load_inception(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        generative.load_inception(None)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        generative.load_inception(corrupt)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, wrong)
    with pytest.raises(ValueError, match=r"\(10, 2048\)"):
        generative.load_inception(wrong)


# ---- end to end ---------------------------------------------------------------------------------


def test_suite_end_to_end_gmmc(tiny_gmmc_file, random_inception_file, data_root, tmp_path):
    options = EvaluationOptions(
        test_folder=str(data_root / "cifar10" / "test"), test_limit=40, limit=12,
        celeba=str(data_root / "celeba"), pgd_eps=(8.0, 32.0), pgd_steps=2,
        cw_iterations=3, cw_targeted_iterations=3, cw_binary_search_steps=2,
        inception_weights=str(random_inception_file), fid_reference_limit=12,
        generated_count=10, sampler_steps=1, grid_per_class=1, batch_size=32,
    )
    output = tmp_path / "evaluation"
    evaluations = ["accuracy", "ece", "ood", "pgd", "cw", "fid", "is", "tsne", "grids"]
    results = run_evaluation(str(tiny_gmmc_file), evaluations, str(output), options)

    assert sorted(results["results"]) == sorted(evaluations)
    assert results["skipped"] == {}
    saved = json.loads((output / "evaluation.json").read_text())
    assert saved["results"]["accuracy"]["count"] == 40
    assert set(saved["results"]["ood"]["auroc"]) == {"celeba", "interpolation"}
    assert all(0 <= value <= 1 for per in saved["results"]["ood"]["auroc"].values() for value in per.values())
    assert set(saved["results"]["pgd"]["robust_accuracy"]) == {"8/255", "32/255"}
    assert saved["results"]["pgd"]["losses"] == ["distance", "margin"]
    assert math.isfinite(saved["results"]["fid"]["fid"])
    assert saved["results"]["is"]["inception_score"] >= 1.0
    report = (output / "report.md").read_text()
    for figure in saved["figures"]:
        assert (output / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({figure})" in report
    assert "samples_closest.png" in saved["figures"]
    assert (output / "fid_reference_fid.npz").is_file()


def test_cli_softmax_skips_fid_without_weights(data_root, tmp_path):
    from jobs.evaluate import main

    torch.manual_seed(0)
    config = tiny_config("softmax")
    save_model_file(str(tmp_path / "model.pt"), build_model(config.model, "softmax"), config)
    output = tmp_path / "out"
    status = main([
        "--checkpoint", str(tmp_path), "--output", str(output), "--evals", "accuracy,pgd,fid",
        "--test-folder", str(data_root / "cifar10" / "test"), "--test-limit", "8", "--limit", "4",
        "--pgd-steps", "1", "--pgd-eps", "8",
    ])
    assert status == 0
    saved = json.loads((output / "evaluation.json").read_text())
    assert saved["results"]["pgd"]["losses"] == ["margin"]
    assert "--inception-weights" in saved["skipped"]["fid"]
    assert "## Skipped" in (output / "report.md").read_text()


def test_buffer_states_from_training_checkpoint(tmp_path):
    from gmmc_dist import checkpoint
    from gmmc_dist.buffer import LocalReplayBuffer

    config = tiny_config("generative")
    model = build_model(config.model, "gmmc")
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = tmp_path / "train" / "checkpoint_000001"
    folder.mkdir(parents=True)
    state = checkpoint.training_state(model, optimizer, scheduler, config, 3, 1, {"buffer": {"kind": "local", "world_size": 1}})
    checkpoint.write_local(str(folder), checkpoint.STATE_FILE, state)
    buffer = LocalReplayBuffer(capacity=20, num_classes=10, reinit_prob=0.0, seed=1)
    checkpoint.write_local(str(folder), "buffer-rank0.pt", {"format": checkpoint.FORMAT_VERSION, **buffer.state_dict()})

    states = load_buffer_states(str(tmp_path))
    assert torch.equal(states, buffer.states)
    assert load_buffer_states(str(tmp_path / "train" / "checkpoint_000001" / "state.pt")).shape == (20, 3, 32, 32)


def test_suite_rejects_bad_inputs_before_work(tiny_gmmc_file, data_root, tmp_path):
    test_folder = str(data_root / "cifar10" / "test")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*jobs/train\.py"):
        run_evaluation(str(tmp_path / "nowhere"), ["accuracy"], str(tmp_path / "out"), EvaluationOptions(test_folder=test_folder))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        run_evaluation(str(corrupt), ["accuracy"], str(tmp_path / "out"), EvaluationOptions(test_folder=test_folder))
    with pytest.raises(FileNotFoundError, match=r"no_such\.pth not found.*--inception-weights"):
        run_evaluation(str(tiny_gmmc_file), ["fid"], str(tmp_path / "out"),
                       EvaluationOptions(test_folder=test_folder, inception_weights=str(tmp_path / "no_such.pth")))
    with pytest.raises(ValueError, match=r"unknown evaluations \['acc'\]"):
        run_evaluation(str(tiny_gmmc_file), ["acc"], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="--test-folder"):
        run_evaluation(str(tiny_gmmc_file), ["pgd"], str(tmp_path / "out"))


def test_celeba_is_resized_to_32(data_root):
    images = load_flat_folder(data_root / "celeba", limit=3)
    assert images.shape == (3, 3, 32, 32)
    assert images.min() >= -1
    assert images.max() <= 1


@pytest.mark.slow
def test_ray_split_matches_local(tiny_gmmc_file, data_root, tmp_path, ray_session):
    common = dict(test_folder=str(data_root / "cifar10" / "test"), test_limit=12, limit=6, pgd_eps=(8.0,), pgd_steps=2)
    local = run_evaluation(str(tiny_gmmc_file), ["accuracy", "pgd"], str(tmp_path / "local"), EvaluationOptions(**common))
    split = run_evaluation(str(tiny_gmmc_file), ["accuracy", "pgd"], str(tmp_path / "ray"),
                           EvaluationOptions(**common, ray_workers=2))
    assert split["results"]["accuracy"] == local["results"]["accuracy"]
    assert split["results"]["pgd"]["clean_accuracy"] == local["results"]["pgd"]["clean_accuracy"]
    assert split["results"]["pgd"]["count"] == 6
