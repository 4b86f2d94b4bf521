"""`robal eval`: run the attacks on a checkpoint and write the evaluation JSON."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data import prepare_data, stratified_indices
from ..distributed import gather_shards
from .attacks import attack_predictions
from .metrics import attack_metrics, class_groups


def test_subset(y_test: np.ndarray, n_test: int | None, seed: int = 0) -> np.ndarray:
    """All test images, or a fixed stratified subset of n_test (n_test / C per class, seeded)."""
    num_classes = int(y_test.max()) + 1
    if n_test is None or n_test >= len(y_test):
        return np.arange(len(y_test))
    if n_test % num_classes:
        raise ValueError(f"--n-test {n_test} must be a multiple of the {num_classes} classes (stratified subset)")
    return np.sort(stratified_indices(y_test, n_test // num_classes, seed))


def to_images(x_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2).float().div(255)


def evaluate_model(model, x_test: np.ndarray, y_test: np.ndarray, attacks: list[str], eps: float,
                   step_size: float, class_counts: list[int], batch_size: int = 500, device="cpu",
                   n_test: int | None = None, seed: int = 0, progress: bool = True,
                   shard: tuple[int, int] = (0, 1)) -> dict:
    """Accuracy of `model` under each attack, with per-class, group and boundary-error metrics.

    shard=(rank, world) under torchrun: each rank attacks its batches of the test images and the predictions are
    gathered (robal/distributed.py), so every rank returns the result one process would."""
    idx = test_subset(y_test, n_test, seed)
    x, y = to_images(x_test[idx]), torch.as_tensor(y_test[idx], dtype=torch.long)
    labels = y.numpy()
    model.eval()
    names = ["clean"] + [a for a in attacks if a != "clean"]
    results, seconds, clean_correct = {}, {}, None
    for name in names:
        start = time.perf_counter()
        preds = attack_predictions(name, model, x, y, eps, step_size, batch_size, device, seed, shard)
        if shard[1] > 1:
            preds = gather_shards(preds, len(x), batch_size)
        preds = preds.numpy()
        seconds[name] = round(time.perf_counter() - start, 2)
        correct = preds == labels
        if clean_correct is None:
            clean_correct = correct
        results[name] = attack_metrics(correct, clean_correct, labels, class_counts)
        results[name]["predictions"] = preds.tolist()
        if progress:
            print(f"{name:>10}: {results[name]['accuracy']:6.2f}%  ({seconds[name]} s)")
    _, rule = class_groups(class_counts)
    return {"attacks": results, "class_counts": list(class_counts), "n_test": len(idx), "labels": labels.tolist(),
            "test_indices_seed": seed, "eps": eps, "step_size": step_size, "groups_rule": rule,
            "seconds": seconds, "checks": []}
