#!/usr/bin/env python
"""Mutation check: do the tests catch small, realistic bugs in the science of src/robal?

Each mutation below is one exact text replacement (old -> new) in one file of src/robal, a bug a person could
plausibly write (a KL direction swapped, a dropped factor, an edge moved), with the tests that should catch it.
For every mutation in turn the script applies it, runs its tests (`pytest -x -q`), records caught (the tests
failed) or missed (they passed), and puts the original text back, in a `finally`, so an exception or Ctrl-C
restores it too. It prints a table and, last, `caught N of M`.

By default the mutations are made in a private copy of src/ (a temporary folder put first on PYTHONPATH), so the
working tree is never touched and other people's test runs in it are not disturbed; `--in-place` edits
src/robal itself instead (and restores each file, checking it afterwards).

A mutation whose old text is not found exactly once stops the script before anything runs (so the list
cannot silently rot as the code changes), and so does a baseline run in which the selected tests fail on the
unmutated code. Not part of CI: it takes a few minutes.

    .venv/bin/python scripts/mutation_check.py            # every mutation
    .venv/bin/python scripts/mutation_check.py --list     # the mutations, without running anything
    .venv/bin/python scripts/mutation_check.py --only trades-kl-direction,few-band-100
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SCIENCE = "tests/test_science.py"


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str          # relative to src/robal
    old: str
    new: str
    description: str
    tests: tuple[str, ...]


def m(id, file, old, new, description, *tests):
    return Mutation(id, file, old, new, description, tuple(tests))


S = SCIENCE + "::"
METHODS = "tests/test_methods.py::"
BEYOND = "tests/test_beyond.py::"
ROBAL = "tests/test_robal.py::"
CORE = "tests/test_core.py::"
F = "tests/test_fidelity.py::"

MUTATIONS = [
    # ------------------------------------------------------------ training frameworks
    m("trades-kl-direction", "train/frameworks.py",
      "return outer + self.beta * batch_kl(z_adv, z_nat).mean(), z_nat, z_adv",
      "return outer + self.beta * batch_kl(z_nat, z_adv).mean(), z_nat, z_adv",
      "TRADES regulariser KL(p_adv || p_nat) instead of KL(p_nat || p_adv)",
      S + "test_trades_loss_is_outer_ce_plus_beta_kl_clean_to_adversarial", S + "test_configured_trades_objectives"),
    m("trades-beta-dropped", "train/frameworks.py",
      "return outer + self.beta * batch_kl(z_adv, z_nat).mean(), z_nat, z_adv",
      "return outer + batch_kl(z_adv, z_nat).mean(), z_nat, z_adv",
      "TRADES: beta dropped from the KL term",
      S + "test_trades_loss_is_outer_ce_plus_beta_kl_clean_to_adversarial", S + "test_configured_trades_objectives"),
    m("trades-outer-on-swapped", "train/frameworks.py",
      'z_nat if self.outer_on == "natural" else z_adv', 'z_adv if self.outer_on == "natural" else z_nat',
      "TRADES: outer_on natural/adversarial swapped",
      S + "test_trades_loss_is_outer_ce_plus_beta_kl_clean_to_adversarial", S + "test_configured_trades_objectives"),
    m("trades-target-softmax-dim", "train/frameworks.py",
      "return F.softmax(attack_logits(model)(x).float(), 1)",
      "return F.softmax(attack_logits(model)(x).float(), 0)",
      "TRADES attack target: softmax over the batch instead of the classes",
      S + "test_trades_attacks_the_kl_to_the_clean_softmax", S + "test_trades_kl_attack_images_by_hand"),
    m("trades-target-predicted-logits", "train/frameworks.py",
      "return F.softmax(attack_logits(model)(x).float(), 1)",
      "return F.softmax(model(x).float(), 1)",
      "TRADES attack target: softmax of the adjusted output instead of the training logits",
      S + "test_trades_attacks_the_kl_to_the_clean_softmax", S + "test_trades_kl_attack_images_by_hand"),
    m("batch-kl-direction", "train/frameworks.py",
      "F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_nat.float(), 1),",
      "F.kl_div(F.log_softmax(logits_nat.float(), 1), F.softmax(logits_adv.float(), 1),",
      "batch_kl (TRADES and MART) computes KL(p_adv || p_nat)",
      S + "test_trades_loss_is_outer_ce_plus_beta_kl_clean_to_adversarial", S + "test_mart_loss_by_hand"),
    m("mart-max-includes-true-class", "train/frameworks.py",
      "wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), 0).amax(1)",
      "wrong = p_adv.amax(1)",
      "MART boosted term: the largest probability including the true class",
      S + "test_mart_loss_by_hand"),
    m("mart-kl-weight-inverted", "train/frameworks.py",
      "(1 - p_nat_true)).mean()", "p_nat_true).mean()",
      "MART: KL weighted by p_nat,y instead of 1 - p_nat,y",
      S + "test_mart_loss_by_hand"),
    m("mart-beta-dropped", "train/frameworks.py",
      "return boosted + self.beta * (batch_kl(z_adv, z_nat)", "return boosted + (batch_kl(z_adv, z_nat)",
      "MART: beta dropped", S + "test_mart_loss_by_hand"),
    m("mart-outer-on-natural", "train/frameworks.py",
      "boosted = self.loss(z_adv, y, class_weight)", "boosted = self.loss(z_nat, y, class_weight)",
      "MART: the outer loss on the clean logits", S + "test_mart_loss_by_hand"),
    m("mart-boost-sign", "train/frameworks.py",
      "- torch.log(1.0001 - wrong).mean()", "+ torch.log(1.0001 - wrong).mean()",
      "MART: the boosted term's sign flipped", S + "test_mart_loss_by_hand"),
    m("pgd-at-class-weight-dropped", "train/frameworks.py",
      "return self.loss(z_adv, y, class_weight), None, z_adv", "return self.loss(z_adv, y), None, z_adv",
      "PGD-AT ignores the per-class weights (CB re-weighting, DRW)",
      S + "test_pgd_at_and_plain_losses_with_class_weights"),
    m("training-attack-on-output", "train/frameworks.py",
      "return pgd(attack_logits(model), x, target,", "return pgd(model, x, target,",
      "training attack differentiates the adjusted output instead of the training logits",
      S + "test_training_attack_differentiates_the_training_logits"),
    m("reat-effective-number-beta", "train/frameworks.py",
      "beta = (n - 1) / n", "beta = n / (n + 1)",
      "REAT attack weights: beta_c = n_c / (n_c + 1)", BEYOND + "test_reat_attack_weights_formula"),
    m("reat-tail-signs-swapped", "train/frameworks.py",
      "sign = torch.where(y[:, None] == y[None, :], same_sign, other_sign)",
      "sign = torch.where(y[:, None] == y[None, :], other_sign, same_sign)",
      "REAT tail alignment: same-class and other-class signs swapped",
      BEYOND + "test_tail_alignment_against_pairwise_sums"),
    # ------------------------------------------------------------ attacks
    m("pgd-raw-gradient", "attacks/gradient.py",
      "x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)",
      "x_adv = project(x_adv.detach() + step_size * grad, x, eps)",
      "PGD steps with the raw gradient instead of its sign",
      S + "test_pgd_steps_with_the_sign_of_the_gradient", S + "test_named_attack_gives_the_hand_computed_images"),
    m("mim-no-l1-normalisation", "attacks/gradient.py",
      "add_(grad / grad.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-12))", "add_(grad)",
      "MIM: the L1 normalisation of each gradient dropped",
      S + "test_mim_accumulates_l1_normalised_gradients", S + "test_named_attack_gives_the_hand_computed_images"),
    m("mim-batch-normalisation", "attacks/gradient.py",
      "grad.abs().mean((1, 2, 3), keepdim=True)", "grad.abs().mean()",
      "MIM: gradients normalised by the batch's mean instead of each image's",
      S + "test_mim_accumulates_l1_normalised_gradients", S + "test_named_attack_gives_the_hand_computed_images"),
    m("random-start-one-sided", "attacks/gradient.py",
      "return x + torch.empty_like(x).uniform_(-eps, eps)", "return x + torch.empty_like(x).uniform_(0, eps)",
      "PGD random start drawn in [0, eps] instead of [-eps, eps]",
      S + "test_named_attack_gives_the_hand_computed_images",
      S + "test_training_attack_differentiates_the_training_logits"),
    m("project-no-box", "attacks/gradient.py",
      "return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)",
      "return torch.min(torch.max(x_adv, x - eps), x + eps)",
      "projection forgets the [0, 1] image box",
      S + "test_fgsm_is_one_signed_gradient_step_of_eps_without_random_start",
      S + "test_named_attack_gives_the_hand_computed_images"),
    m("cw-true-class-in-max", "attacks/gradient.py",
      'other = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")).amax(1)',
      "other = logits.amax(1)",
      "CW margin: the max over all classes, the true one included",
      S + "test_cw_and_kl_losses_by_hand", S + "test_cw_attack_ascends_the_clamped_margin"),
    m("kl-attack-loss-direction", "attacks/gradient.py",
      'return F.kl_div(F.log_softmax(logits.float(), 1), target_probs, reduction="none").sum(1)',
      'return F.kl_div(torch.log(target_probs), F.softmax(logits.float(), 1), reduction="none").sum(1)',
      "KL attack loss: KL(p_adv || p_clean) instead of KL(p_clean || p_adv)",
      S + "test_cw_and_kl_losses_by_hand", S + "test_trades_kl_attack_images_by_hand"),
    m("kl-attack-loss-mean", "attacks/gradient.py",
      'target_probs, reduction="none").sum(1)', 'target_probs, reduction="none").mean(1)',
      "KL attack loss: mean over classes instead of the sum", S + "test_cw_and_kl_losses_by_hand"),
    m("fgsm-random-start", "attacks/gradient.py",
      "return pgd(forward, x, target, eps, eps, 1, loss_fn, random_start=False)",
      "return pgd(forward, x, target, eps, eps, 1, loss_fn, random_start=True)",
      "FGSM from a random start", S + "test_fgsm_is_one_signed_gradient_step_of_eps_without_random_start"),
    m("restarts-keep-weakest", "attacks/gradient.py",
      "better = final > best_loss", "better = final < best_loss",
      "PGD restarts keep the restart with the lowest loss", CORE + "test_pgd_restarts_keep_the_strongest"),
    m("pgd20-runs-10-steps", "attacks/__init__.py",
      "    return pgd(forward, x, y, eps, step_size, 20)\n", "    return pgd(forward, x, y, eps, step_size, 10)\n",
      "the pgd20 attack runs 10 steps",
      S + "test_each_attack_name_runs_its_number_of_steps",
      "tests/test_speed_equivalence.py::test_eval_path_is_the_plain_attack"),
    m("mim-runs-10-steps", "attacks/__init__.py",
      "step_size, 20, momentum=1.0)", "step_size, 10, momentum=1.0)",
      "the mim attack runs 10 steps", S + "test_each_attack_name_runs_its_number_of_steps"),
    m("mim-momentum-0.9", "attacks/__init__.py",
      "20, momentum=1.0)", "20, momentum=0.9)",
      "MIM with momentum 0.9 instead of 1.0", S + "test_named_attack_gives_the_hand_computed_images"),
    m("cw-kappa-0", "attacks/__init__.py",
      "partial(cw_loss, kappa=50.0)", "partial(cw_loss, kappa=0.0)",
      "CW attack with kappa 0 instead of 50",
      S + "test_named_attack_gives_the_hand_computed_images", S + "test_cw_attack_ascends_the_clamped_margin"),
    # ------------------------------------------------------------ heads and inference-time adjustments
    m("cdt-temperature-inverted", "models/heads.py",
      "(counts.max() / counts) ** tau", "(counts / counts.max()) ** tau",
      "CDT training temperature (n_c / n_max)^tau instead of (n_max / n_c)^tau",
      S + "test_cdt_head_divides_training_logits_by_class_temperatures",
      S + "test_cdt_model_trains_on_tempered_logits_and_predicts_with_plain_ones"),
    m("cdt-multiplies", "models/heads.py",
      "return self(f) / self.temperature", "return self(f) * self.temperature",
      "CDT training logits multiplied by the temperature",
      S + "test_cdt_head_divides_training_logits_by_class_temperatures"),
    m("lws-scale-added", "models/heads.py",
      "self.bias if self.use_bias else None) * self.class_scale",
      "self.bias if self.use_bias else None) + self.class_scale",
      "LWS adds the class scale instead of multiplying", S + "test_lws_head_scales_each_class"),
    m("lws-bias-kept", "models/heads.py",
      "self.bias if self.use_bias else None)", "self.bias)",
      "LWS keeps the FC bias (the reference leaves it out)", S + "test_lws_head_scales_each_class",
      F + "test_lws_scales_the_fc_logits_without_the_bias_and_older_checkpoints_keep_theirs"),
    m("cdt-attack-tempered", "models/heads.py",
      'return self(f) if self.attack_on == "raw" else self.training_logits(f)', "return self.training_logits(f)",
      "CDT's training attack on the tempered logits (the reference attacks the raw ones)",
      F + "test_cdt_training_attack_maximises_ce_on_the_raw_logits_by_default"),
    m("focal-prior-odds-inverted", "models/heads.py",
      "return torch.log(pi / (1 - pi)).float()", "return torch.log((1 - pi) / pi).float()",
      "focal bias init at log((1 - pi) / pi)", F + "test_focal_prior_bias_is_the_log_odds_of_each_class_prior"),
    m("trades-start-uniform", "train/frameworks.py",
      'start = "normal" if self.outer_on == "natural" else "uniform"', 'start = "uniform"',
      "TRADES' attack from a uniform start (the reference: x + 0.001 N(0, I))",
      S + "test_trades_kl_attack_images_by_hand",
      F + "test_trades_and_mart_start_at_x_plus_small_gaussian_noise_pgd_at_and_robal_uniform"),
    m("normal-start-std", "attacks/gradient.py",
      "def normal_start(x, eps, std: float = 0.001):", "def normal_start(x, eps, std: float = 0.01):",
      "the TRADES start with std 0.01", S + "test_trades_kl_attack_images_by_hand",
      F + "test_trades_and_mart_start_at_x_plus_small_gaussian_noise_pgd_at_and_robal_uniform"),
    m("finetune-bn-always-frozen", "train/trainer.py",
      "        if t.frozen_bn:  # the fine-tune's backbone keeps its BatchNorm statistics",
      '        if t.trainable != "all":  # the fine-tune\'s backbone keeps its BatchNorm statistics',
      "fine-tunes always freeze BatchNorm (the reference re-estimates it)",
      F + "test_finetune_batchnorm_statistics_move_in_reference_mode_and_stay_when_frozen"),
    m("cosine-gamma-multiplied", "models/heads.py",
      "self.weight / (self.weight.norm(dim=1, keepdim=True) + self.gamma)",
      "self.weight / (self.weight.norm(dim=1, keepdim=True) * (1 + self.gamma))",
      "RoBal cosine head: ||w|| (1 + gamma) instead of ||w|| + gamma",
      ROBAL + "test_cosine_head_is_scale_invariant_up_to_gamma"),
    m("posthoc-la-sign", "models/adjust.py",
      "return logits - self.tau * self.log_prior", "return logits + self.tau * self.log_prior",
      "post-hoc logit adjustment / RoBal boundary adjustment with the wrong sign",
      METHODS + "test_posthoc_logit_adjustment", ROBAL + "test_boundary_adjustment_moves_predictions_to_tail_classes"),
    m("cdt-post-exponent-sign", "models/adjust.py",
      "torch.as_tensor(class_counts, dtype=torch.float) ** tau)",
      "torch.as_tensor(class_counts, dtype=torch.float) ** -tau)",
      "inference-time CDT multiplies by n_c^tau", METHODS + "test_cdt_post_and_scale"),
    # ------------------------------------------------------------ losses and weights
    m("ldam-margin-power", "losses.py",
      "m = _counts(class_counts) ** -0.25", "m = _counts(class_counts) ** -0.5",
      "LDAM margins n^-1/2 instead of n^-1/4", METHODS + "test_ldam_margins_formula", METHODS + "test_ldam_loss"),
    m("margin-added", "losses.py",
      "z = z - F.one_hot(y, z.shape[1]) * margins[y][:, None]",
      "z = z + F.one_hot(y, z.shape[1]) * margins[y][:, None]",
      "margin losses add the margin to the target logit",
      METHODS + "test_ldam_loss", METHODS + "test_cos_margin_loss", METHODS + "test_robal_loss"),
    m("robal-margin-without-s", "losses.py",
      "return m0 + (tau_m / s) * torch.log(counts / counts.min())",
      "return m0 + tau_m * torch.log(counts / counts.min())",
      "RoBal margin tau_m log(n_y / n_min) without the 1/s",
      ROBAL + "test_robal_margins_grow_with_class_size_only_through_tau_m", S + "test_configured_trades_objectives"),
    m("robal-tau-b-dropped", "losses.py",
      "tau_b * log_prior(class_counts))", "log_prior(class_counts))",
      "RoBal loss: tau_b dropped from the class-aware bias",
      ROBAL + "test_robal_loss_equals_hand_computation", S + "test_configured_trades_objectives"),
    m("logit-adjust-bias-sign", "losses.py",
      "bias=tau * log_prior(class_counts))", "bias=-tau * log_prior(class_counts))",
      "logit-adjusted loss subtracts tau log pi", METHODS + "test_logit_adjust_loss"),
    m("focal-softmax-weight", "losses.py",
      "per_sample = -((1 - log_p.exp()) ** self.gamma) * log_p", "per_sample = -(log_p.exp() ** self.gamma) * log_p",
      "softmax focal weight p^gamma instead of (1 - p)^gamma", METHODS + "test_focal_softmax"),
    m("focal-sigmoid-mean", "losses.py",
      "per_sample = ((1 - p_t) ** self.gamma * bce).sum(1)", "per_sample = ((1 - p_t) ** self.gamma * bce).mean(1)",
      "sigmoid focal: mean over classes instead of the sum",
      METHODS + "test_focal_sigmoid_and_class_weights", S + "test_cb_focal_loss_on_cifar10_lt_counts"),
    m("focal-scale-dropped", "losses.py",
      "z = z.float() * self.scale", "z = z.float()",
      "focal loss ignores its scale s", S + "test_focal_loss_scale_in_both_forms"),
    m("class-weights-normalised", "losses.py",
      "return (per_sample * class_weight[y]).mean()",
      "return (per_sample * class_weight[y]).sum() / class_weight[y].sum()",
      "class-weighted loss divided by the batch's weight sum instead of its size",
      METHODS + "test_focal_sigmoid_and_class_weights", S + "test_cb_focal_loss_on_cifar10_lt_counts"),
    m("harl-spread-abs", "losses.py",
      "self.beta * ((lc - mean) ** 2).mean()", "self.beta * (lc - mean).abs().mean()",
      "HARL: mean absolute deviation instead of the variance", BEYOND + "test_harl_loss"),
    m("harl-present-classes-only", "losses.py",
      "mean = lc.mean()", "mean = lc[lc > 0].mean()",
      "HARL: mean over the classes present in the batch only", BEYOND + "test_harl_loss"),
    m("harl-class-weight-dropped", "losses.py",
      "per_sample = per_sample * class_weight[y]", "per_sample = per_sample",
      "HARL ignores the per-class weights", S + "test_harl_with_scale_and_class_weights"),
    m("cb-weights-effective-number", "train/weighting.py",
      "w = (1 - beta) / (1 - beta ** counts)", "w = (1 - beta ** counts) / (1 - beta)",
      "class-balanced weights proportional to the effective number instead of its inverse",
      METHODS + "test_effective_number_weights_formula", S + "test_cb_focal_loss_on_cifar10_lt_counts"),
    m("drw-off-by-one", "train/weighting.py",
      "if epoch + 1 >= start_epoch else None", "if epoch >= start_epoch else None",
      "DRW starts one epoch late", METHODS + "test_drw_starts_with_the_lr_decay_epoch"),
    m("power-budget-inverted", "train/budgets.py",
      "(counts.max() / counts).pow(tau)", "(counts / counts.max()).pow(tau)",
      "class-wise eps budget shrinks for rare classes", BEYOND + "test_power_budget_and_warmup"),
    m("lt-counts-exponent", "data/longtail.py",
      "(i / (num_classes - 1))) for i", "(i / num_classes)) for i",
      "long-tailed profile exponent i / C instead of i / (C - 1)", CORE + "test_cifar10_lt_ratio_50_counts"),
    # ------------------------------------------------------------ metrics
    m("few-band-100", "evaluate/metrics.py",
      '"few": lambda n: n < 200', '"few": lambda n: n < 100',
      "few band n < 100 instead of n < 200",
      S + "test_class_groups_on_cifar10_lt_ratio_50", S + "test_class_group_edges"),
    m("many-band-inclusive", "evaluate/metrics.py",
      '"many": lambda n: n > 1000', '"many": lambda n: n >= 1000',
      "many band n >= 1000 (1000 counted as many)", S + "test_class_group_edges"),
    m("medium-band-exclusive", "evaluate/metrics.py",
      '"medium": lambda n: 200 <= n <= 1000', '"medium": lambda n: 200 < n <= 1000',
      "medium band 200 < n (200 falls in no group)", S + "test_class_group_edges"),
    m("thirds-floor", "evaluate/metrics.py",
      "order[round(i * k / 3):round((i + 1) * k / 3)]", "order[i * k // 3:(i + 1) * k // 3]",
      "thirds fallback split by floor instead of rounding", S + "test_groups_fall_back_to_thirds_by_training_count"),
    m("boundary-error-all-errors", "evaluate/metrics.py",
      "boundary = clean_correct & ~correct", "boundary = ~correct",
      "boundary error counts every wrong image, clean mistakes included",
      S + "test_metrics_by_hand_on_cifar10_lt_groups",
      S + "test_balanced_robustness_differs_from_accuracy_on_an_imbalanced_test_set"),
    m("natural-error-under-attack", "evaluate/metrics.py",
      '"natural_error": float(100 * (~clean_correct).mean())', '"natural_error": float(100 * (~correct).mean())',
      "natural error from the attacked predictions", S + "test_metrics_by_hand_on_cifar10_lt_groups"),
    m("balanced-robustness-median", "evaluate/metrics.py",
      '"balanced_robustness": float(np.nanmean(per_class))', '"balanced_robustness": float(np.nanmedian(per_class))',
      "balanced robustness as the median class", S + "test_metrics_by_hand_on_cifar10_lt_groups"),
    m("standard-error-n-minus-1", "evaluate/metrics.py",
      "max(p * (1 - p), 0) / n)", "max(p * (1 - p), 0) / (n - 1))",
      "standard error with n - 1", S + "test_standard_error_and_strongest_attack"),
]


def check_list(mutations: list[Mutation], src: Path) -> None:
    """Every old text occurs exactly once in its file and differs from the new text; ids are unique."""
    problems = []
    ids = [mu.id for mu in mutations]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{dup}: id used twice")
    for mu in mutations:
        path = src / "robal" / mu.file
        if not path.is_file():
            problems.append(f"{mu.id}: no file src/robal/{mu.file}")
            continue
        count = path.read_text().count(mu.old)
        if count != 1:
            problems.append(f"{mu.id}: old text found {count} times in src/robal/{mu.file} (must be exactly once): "
                            f"{mu.old!r}")
        if mu.old == mu.new:
            problems.append(f"{mu.id}: old and new text are the same")
        if not mu.tests:
            problems.append(f"{mu.id}: no tests named")
    if problems:
        sys.exit("mutation_check: the mutation list does not fit the code:\n  " + "\n  ".join(problems))


def run_pytest(tests, env, timeout: float, stop_first: bool = True) -> tuple[int, str]:
    # addopts reset: the project's own "-q" would make ours "-qq", which drops pytest's summary line
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           *(["-x"] if stop_first else []), *tests]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def apply(path: Path, original: str, mu: Mutation) -> str:
    mutated = original.replace(mu.old, mu.new, 1)
    path.write_text(mutated)
    return mutated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation ids")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--in-place", action="store_true",
                        help="mutate src/robal in the working tree (restored after each) instead of a private copy")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    args = parser.parse_args(argv)

    mutations = MUTATIONS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {mu.id for mu in MUTATIONS}]
        if unknown:
            sys.exit(f"mutation_check: unknown mutation id(s): {', '.join(unknown)}")
        mutations = [mu for mu in MUTATIONS if mu.id in wanted]
    check_list(MUTATIONS, SRC)
    if args.list:
        for mu in mutations:
            print(f"{mu.id:30} src/robal/{mu.file:22} {mu.description}\n{'':30} tests: {' '.join(mu.tests)}")
        print(f"{len(mutations)} mutations")
        return 0

    # a kill (SIGTERM) unwinds like Ctrl-C, so the `finally` blocks put the original text back
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    workdir = None
    if args.in_place:
        src = SRC
    else:
        workdir = Path(tempfile.mkdtemp(prefix="robal-mutation-"))
        src = workdir / "src"
        shutil.copytree(SRC / "robal", src / "robal", ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        found = subprocess.run([sys.executable, "-c", "import robal; print(robal.__file__)"], env=env, cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        if Path(found).resolve() != (src / "robal" / "__init__.py").resolve():
            sys.exit(f"mutation_check: the tests would import robal from {found}, not from {src / 'robal'}")

        selected = sorted({t for mu in mutations for t in mu.tests})
        start = time.perf_counter()
        rc, last = run_pytest(selected, env, args.timeout, stop_first=False)
        if rc != 0:
            sys.exit(f"mutation_check: the selected tests do not pass on the unmutated code ({last}); fix that first")
        print(f"baseline: {len(selected)} selected tests pass on the unmutated code ({last}, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)

        rows = []
        for mu in mutations:
            path = src / "robal" / mu.file
            original = path.read_text()
            t0 = time.perf_counter()
            mutated = None
            try:
                mutated = apply(path, original, mu)
                rc, last = run_pytest(mu.tests, env, args.timeout)
            finally:
                if mutated is not None and path.read_text() != mutated:
                    print(f"warning: src/robal/{mu.file} changed while mutation {mu.id} was applied; "
                          f"writing back the text it had before the mutation", file=sys.stderr)
                path.write_text(original)
            if path.read_text() != original:
                sys.exit(f"mutation_check: could not restore src/robal/{mu.file}")
            if rc in (4, 5):  # usage error / nothing collected: a test id has rotted
                sys.exit(f"mutation_check: {mu.id}: pytest could not run the named tests ({last})")
            result = "caught" if rc == 1 else "missed" if rc == 0 else f"caught (pytest exit {rc})"
            rows.append((mu, result, time.perf_counter() - t0))
            print(f"  {mu.id:30} {result:8} {time.perf_counter() - t0:5.1f} s", flush=True)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    width = max(len(mu.id) for mu, _, _ in rows)
    print()
    print(f"| {'mutation':{width}} | {'file':22} | {'description':90} | result |")
    print(f"| {'-' * width} | {'-' * 22} | {'-' * 90} | ------ |")
    for mu, result, _ in rows:
        description = mu.description.replace("|", "\\|")  # KL(p || q), ||w||: markdown cells
        print(f"| {mu.id:{width}} | {mu.file:22} | {description:90} | {result} |")
    caught = sum(result.startswith("caught") for _, result, _ in rows)
    print(f"caught {caught} of {len(rows)}")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
