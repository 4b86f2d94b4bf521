"""`robal eval`: run the attacks on a checkpoint and write the evaluation JSON."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data import prepare_data, stratified_indices
from ..distributed import barrier, gather_shards
from .attacks import attack_predictions, autoattack_settings, is_autoattack, output_classes
from .resume import EvalState, evaluation_fingerprint
from .metrics import NO_COUNTS, attack_metrics, class_groups


def test_subset(y_test: np.ndarray, n_test: int | None, seed: int = 0) -> np.ndarray:
    """All test images, or a fixed stratified subset of n_test (n_test / C per class, seeded)."""
    num_classes = int(y_test.max()) + 1
    if n_test is None or n_test >= len(y_test):
        return np.arange(len(y_test))
    if n_test % num_classes:
        raise ValueError(f"--n-test {n_test} must be a multiple of the {num_classes} classes (stratified subset)")
    return np.sort(stratified_indices(y_test, n_test // num_classes, seed))


def to_images(x) -> torch.Tensor:
    """[0, 1] float NCHW images from uint8 N x H x W x C arrays (the .npz layout); float images pass as they are."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div(255)


def evaluate_model(model, x_test: np.ndarray, y_test: np.ndarray, attacks: list[str], eps: float,
                   step_size: float, class_counts: list[int], batch_size: int = 500, device="cpu",
                   n_test: int | None = None, seed: int = 0, progress: bool = True,
                   shard: tuple[int, int] = (0, 1), state_dir=None, fingerprint: dict | None = None) -> dict:
    """Accuracy of `model` under each attack, with per-class, group and boundary-error metrics; each AutoAttack
    version's result carries its exact `settings` (read back from pyautoattack).

    shard=(rank, world) under torchrun: each rank attacks its batches of the test images and the predictions are
    gathered (robal/distributed.py), so every rank returns the result one process would.

    state_dir: make the evaluation resumable (resume.py): each attack's predictions on each batch are stored
    there as they are computed, and a rerun with the same arguments reads them back instead of attacking again,
    returning the same result as an uninterrupted run (apart from `seconds`). `fingerprint`: JSON-able values
    that identify the model beyond its weights (e.g. checkpoint path, inference adjustments, factory and its
    arguments); a state made with another fingerprint is discarded. The caller removes the state
    (`resume.clear_state(state_dir)`) once it has written the result."""
    idx = test_subset(y_test, n_test, seed)
    x, y = to_images(x_test[idx]), torch.as_tensor(y_test[idx], dtype=torch.long)
    labels = y.numpy()
    model.eval()
    names = ["clean"] + [a for a in attacks if a != "clean"]
    num_classes = output_classes(model, x, device)
    store = None
    if state_dir is not None:
        key = evaluation_fingerprint(model, x, y, names, eps, step_size, batch_size, seed, device, fingerprint)
        for turn in ((0,) if shard[1] == 1 else (0, 1)):  # rank 0 first: it discards a stale state
            if (shard[0] == 0) == (turn == 0):
                store = EvalState.open(state_dir, key, log=print if progress else None)
            if shard[1] > 1:
                barrier()
    results, seconds, clean_correct = {}, {}, None
    for name in names:
        start = time.perf_counter()
        preds = attack_predictions(name, model, x, y, eps, step_size, batch_size, device, seed, shard, store,
                                   num_classes)
        if shard[1] > 1:
            preds = gather_shards(preds, len(x), batch_size)
        preds = preds.numpy()
        seconds[name] = round(time.perf_counter() - start + (store.reused.get(name, 0.0) if store else 0.0), 2)
        correct = preds == labels
        if clean_correct is None:
            clean_correct = correct
        results[name] = attack_metrics(correct, clean_correct, labels, class_counts, num_classes)
        if is_autoattack(name):
            results[name]["settings"] = autoattack_settings(name, eps, seed, num_classes)
        results[name]["predictions"] = preds.tolist()
        if progress:
            print(f"{name:>10}: {results[name]['accuracy']:6.2f}%  ({seconds[name]} s)")
    rule = class_groups(class_counts)[1] if class_counts is not None else NO_COUNTS
    return {"attacks": results, "class_counts": None if class_counts is None else list(class_counts),
            "num_classes": num_classes, "n_test": len(idx), "labels": labels.tolist(),
            "test_indices_seed": seed, "eps": eps, "step_size": step_size, "batch_size": batch_size,
            "groups_rule": rule, "seconds": seconds, "checks": []}
