"""Evaluation of trained models: calibration, OOD detection, attacks, FID/IS, figures and the suite.

Modules: `calibration` (ECE), `ood` (scores, AUROC), `attacks` (PGD L-inf, C&W L2), `generative`
(Inception features, IS, FID), `visual` (PNG figures), `inputs` (image sets as tensors) and
`suite` (`run_evaluation`, used by jobs/evaluate.py).
"""
