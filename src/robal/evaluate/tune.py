"""`robal tune-tau`: choose RoBal's boundary-adjustment tau_p on the held-out validation split."""
from __future__ import annotations

import numpy as np

from .runner import evaluate_model

CRITERIA = {
    "mean": lambda clean, robust: (clean + robust) / 2,
    "robust": lambda clean, robust: robust,
    "clean": lambda clean, robust: clean,
}


def with_tau(inference: list[dict], tau: float) -> list[dict]:
    """The adjustments with the last logit_adjust step set to tau (appended when absent)."""
    inference = [dict(i) for i in inference]
    steps = [i for i in inference if i.get("name") == "logit_adjust"]
    if steps:
        steps[-1]["tau"] = tau
    else:
        inference.append({"name": "logit_adjust", "tau": tau})
    return inference


def tune_tau(model, x_val: np.ndarray, y_val: np.ndarray, candidates: list[float], attack: str, eps: float,
             step_size: float, batch_size: int = 500, device="cpu", criterion: str = "mean") -> dict:
    """Clean and robust accuracy on the validation split for each tau_p; the best by `criterion`."""
    if len(y_val) == 0:
        raise ValueError("this run has no held-out validation split: train it with data.val_per_class > 0 "
                         "(e.g. --set data.val_per_class=10); tau_p is never tuned on the test set")
    score = CRITERIA[criterion]
    base = model.spec["inference"]
    counts = model.spec["class_counts"]
    rows = []
    for tau in candidates:
        model.set_inference(with_tau(base, tau))
        res = evaluate_model(model, x_val, y_val, [attack], eps, step_size, counts, batch_size, device,
                             progress=False)["attacks"]
        clean, robust = res["clean"]["accuracy"], res[attack]["accuracy"]
        rows.append({"tau_p": tau, "clean": clean, attack: robust, "score": score(clean, robust),
                     "clean_per_class": res["clean"]["per_class"], f"{attack}_per_class": res[attack]["per_class"]})
    model.set_inference(base)
    best = max(rows, key=lambda r: r["score"])
    return {"candidates": rows, "best_tau_p": best["tau_p"], "criterion": criterion, "attack": attack,
            "n_val": int(len(y_val))}
