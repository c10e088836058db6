r"""Evaluate a trained GMMC, softmax or JEM model: accuracy, calibration, OOD, attacks, FID/IS, figures.

Example (CPU, a quick look on 200 test images):
    python jobs/evaluate.py --checkpoint runs/gmmc-cifar10-cpu --test-folder ../shared/data/cifar10/test \
        --celeba ../shared/data/celeba --limit 200 --output runs/gmmc-cifar10-cpu/evaluation

Writes evaluation.json, report.md and PNG figures under --output.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gmmc_dist.evaluation.suite import DEFAULT_EVALUATIONS, EVALUATIONS, EvaluationOptions, run_evaluation

DEFAULTS = EvaluationOptions()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model.pt file, training checkpoint folder or run output folder (local path or fsspec URL)")
    parser.add_argument("--evals", default=",".join(DEFAULT_EVALUATIONS),
                        help=f"comma-separated evaluations out of {','.join(EVALUATIONS)} (default: %(default)s; "
                             "fid and is are skipped with a message when --inception-weights is not given)")
    parser.add_argument("--output", required=True, help="folder or fsspec URL for evaluation.json, report.md and PNGs")
    data = parser.add_argument_group("data")
    data.add_argument("--test-folder", help="ImageFolder split of the test set, e.g. ../shared/data/cifar10/test")
    data.add_argument("--test-shards", help="webdataset shards (folder with manifest.json) holding the test split")
    data.add_argument("--celeba", help="flat folder of CelebA images, resized to 32x32 for OOD detection")
    data.add_argument("--svhn-shards", help="SVHN shards whose test split is an OOD set")
    data.add_argument("--cifar100-shards", help="CIFAR-100 shards whose test split is an OOD set")
    data.add_argument("--no-interpolations", action="store_true", help="leave CIFAR-10 interpolations out of the OOD sets")
    data.add_argument("--limit", type=int, default=DEFAULTS.limit,
                      help="test images (and images per OOD set) for ood, pgd, cw and tsne; 0: all (default: %(default)s)")
    data.add_argument("--test-limit", type=int, default=DEFAULTS.test_limit, help="test images for accuracy and ECE; 0: all")
    attack = parser.add_argument_group("attacks")
    attack.add_argument("--pgd-loss", choices=("adaptive", "margin", "distance", "ce"), default=DEFAULTS.pgd_loss,
                        help="loss PGD maximises; adaptive = distance to the true class mean and logit margin for GMMC, "
                             "margin for softmax/JEM (cross-entropy can mask gradients of GMMC)")
    attack.add_argument("--pgd-steps", type=int, default=DEFAULTS.pgd_steps, help="PGD iterations (default: %(default)s)")
    attack.add_argument("--pgd-eps", default=",".join(f"{eps:g}" for eps in DEFAULTS.pgd_eps),
                        help="L-inf radii in units of 1/255 on [0, 1] pixels (default: %(default)s)")
    attack.add_argument("--pgd-step-size", type=float, default=DEFAULTS.pgd_step_size,
                        help="PGD step in units of 1/255 (default 0: 2.5 eps / steps)")
    attack.add_argument("--pgd-restarts", type=int, default=DEFAULTS.pgd_restarts, help="random restarts per PGD loss")
    attack.add_argument("--cw-iterations", type=int, default=DEFAULTS.cw_iterations,
                        help="Adam iterations per binary-search step of untargeted C&W (default: %(default)s)")
    attack.add_argument("--cw-targeted-iterations", type=int, default=DEFAULTS.cw_targeted_iterations,
                        help="the same for targeted C&W (default: %(default)s; 0 skips the targeted attack)")
    attack.add_argument("--cw-binary-search-steps", type=int, default=DEFAULTS.cw_binary_search_steps)
    generated = parser.add_argument_group("FID, IS and sample grids")
    generated.add_argument("--inception-weights", help="local Inception-v3 weights, normally pt_inception-2015-12-05-6726825d.pth")
    generated.add_argument("--fid-reference-folder", help="ImageFolder root whose splits form the FID reference set "
                           "(default: the parent of --test-folder, i.e. CIFAR-10 train + test)")
    generated.add_argument("--fid-reference-stats", help="local .npz cache of the reference statistics (read if present, else written)")
    generated.add_argument("--fid-reference-limit", type=int, default=0, help="reference images to use; 0: all")
    generated.add_argument("--generated-count", type=int, default=DEFAULTS.generated_count, help="generated images for FID and IS")
    generated.add_argument("--generated-source", choices=("auto", "buffer", "sampler"), default=DEFAULTS.generated_source,
                           help="replay buffer of the checkpoint, fresh sampler chains, or auto (buffer when present)")
    generated.add_argument("--sampler-steps", type=int, default=0, help="steps of fresh chains; 0: the checkpoint's sampler.steps")
    run = parser.add_argument_group("execution")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    run.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    run.add_argument("--seed", type=int, default=DEFAULTS.seed)
    run.add_argument("--ray-workers", type=int, default=0,
                     help="split accuracy, PGD and C&W over this many Ray tasks (0: run in this process)")
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> EvaluationOptions:
    try:
        pgd_eps = tuple(float(value) for value in args.pgd_eps.split(",") if value.strip())
    except ValueError as error:
        raise SystemExit(f"invalid --pgd-eps {args.pgd_eps!r}: give numbers in units of 1/255, e.g. 4,8,16,32") from error
    return EvaluationOptions(
        test_folder=args.test_folder, test_shards=args.test_shards, test_limit=args.test_limit, limit=args.limit,
        celeba=args.celeba, svhn_shards=args.svhn_shards, cifar100_shards=args.cifar100_shards,
        interpolations=not args.no_interpolations, pgd_eps=pgd_eps, pgd_steps=args.pgd_steps,
        pgd_step_size=args.pgd_step_size, pgd_restarts=args.pgd_restarts, pgd_loss=args.pgd_loss,
        cw_iterations=args.cw_iterations, cw_targeted_iterations=args.cw_targeted_iterations,
        cw_binary_search_steps=args.cw_binary_search_steps, inception_weights=args.inception_weights,
        fid_reference_folder=args.fid_reference_folder, fid_reference_stats=args.fid_reference_stats,
        fid_reference_limit=args.fid_reference_limit, generated_count=args.generated_count,
        generated_source=args.generated_source, sampler_steps=args.sampler_steps, batch_size=args.batch_size,
        seed=args.seed, ray_workers=args.ray_workers,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    evaluations = [name.strip() for name in args.evals.split(",") if name.strip()]
    results = run_evaluation(args.checkpoint, evaluations, args.output, options_from_args(args), args.device)
    logging.getLogger("evaluate").info(
        "finished %s; skipped %s; report in %s/report.md",
        sorted(results["results"]), sorted(results["skipped"]) or "none", args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
