"""Classifier heads. `forward(f)` gives the raw logits z the method predicts with (before inference-time
adjustments); `training_logits(f)` gives what the training losses see (differs for CDT and TDE);
`attack_logits(f)` what the training attack maximises its loss on (the training logits, except CDT's)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..registry import ConfigError, Registry

HEADS = Registry("head")


class LinearHead(nn.Linear):
    """FC: z_c = <w_c, f> + b_c."""

    def training_logits(self, f):
        return self(f)

    def attack_logits(self, f):
        return self.training_logits(f)


class CosineHead(nn.Module):
    """Cosine classifier: z_c = <f / ||f||, w_c / (||w_c|| + gamma)>.

    gamma = 0 is the plain cosine head; gamma > 0 is RoBal's scale-invariant head (gamma 1/32), where a small
    ||w_c|| shrinks class c's logits, so the norm still carries a little per-class scale.
    """

    def __init__(self, in_features: int, num_classes: int, gamma: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.gamma = gamma

    def normalised_weight(self):
        return self.weight / (self.weight.norm(dim=1, keepdim=True) + self.gamma)

    def forward(self, f):
        return F.normalize(f, dim=1) @ self.normalised_weight().t()

    def training_logits(self, f):
        return self(f)

    def attack_logits(self, f):
        return self.training_logits(f)


class LWSHead(LinearHead):
    """Learnable weight scaling: z_c = s_c <w_c, f>, s_c learned (the backbone usually frozen), the FC bias left
    out as in the reference's LWS classifier; `bias: true` keeps it inside the scaling: z_c = s_c (<w_c, f> + b_c).
    The bias parameter exists either way, so a linear head's checkpoint loads into it."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = False):
        super().__init__(in_features, num_classes)
        self.class_scale = nn.Parameter(torch.ones(num_classes))
        self.use_bias = bias

    def forward(self, f):
        return F.linear(f, self.weight, self.bias if self.use_bias else None) * self.class_scale


CDT_ATTACK_ON = ("raw", "tempered")


class CDTHead(LinearHead):
    """Class-dependent temperature (Ye et al.): the training loss sees z_c / a_c with a_c = (n_max / n_c)^tau;
    plain z at inference. The training attack maximises its loss on the raw z (`attack_on: raw`, as the RoBal
    reference code, which applies the temperatures in the outer loss only) or on z / a (`tempered`)."""

    def __init__(self, in_features: int, num_classes: int, class_counts, tau: float = 0.1, attack_on: str = "raw"):
        super().__init__(in_features, num_classes)
        if attack_on not in CDT_ATTACK_ON:
            raise ConfigError(f"model.head_args.attack_on must be one of {', '.join(CDT_ATTACK_ON)}; got '{attack_on}'")
        counts = torch.as_tensor(class_counts, dtype=torch.float)
        self.register_buffer("temperature", (counts.max() / counts) ** tau)
        self.attack_on = attack_on

    def training_logits(self, f):
        return self(f) / self.temperature

    def attack_logits(self, f):
        return self(f) if self.attack_on == "raw" else self.training_logits(f)


def batch_mean(f):
    """Mean over the batch; over the global batch when several ranks each hold a slice of it (torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return f.mean(0)
    total = torch.cat([f.sum(0), f.new_full((1,), len(f))])
    dist.all_reduce(total)
    return total[:-1] / total[-1]


class TDEHead(CosineHead):
    """Cosine head that tracks the moving-average feature direction d in training (Tang et al., TDE).

    Inference-time removal (the `tde` adjustment) subtracts alpha * cos(f, d) * d-hat from the unit feature.
    """

    def __init__(self, in_features: int, num_classes: int, gamma: float = 0.0, momentum: float = 0.9):
        super().__init__(in_features, num_classes, gamma)
        self.momentum = momentum
        self.register_buffer("mean_feature", torch.zeros(in_features))

    def training_logits(self, f):
        if self.training:
            with torch.no_grad():
                self.mean_feature.mul_(self.momentum).add_(batch_mean(f.detach().float()), alpha=1 - self.momentum)
        return self(f)

    def logits_without_direction(self, f, alpha: float):
        unit = F.normalize(f, dim=1)
        d = F.normalize(self.mean_feature, dim=0)
        return (unit - alpha * (unit @ d)[:, None] * d) @ self.normalised_weight().t()


def prior_bias(class_counts) -> torch.Tensor:
    """b_c = log(pi_c / (1 - pi_c)), pi_c = n_c / n: a sigmoid (focal) loss starts from each class's prior
    (the reference's `focal_init`, after Lin et al.)."""
    pi = torch.as_tensor(class_counts, dtype=torch.float64)
    pi = pi / pi.sum()
    return torch.log(pi / (1 - pi)).float()


BIAS_INITS = ("default", "prior")


@HEADS.register("linear")
def linear(in_features, num_classes, class_counts, bias_init: str = "default"):
    """`bias_init: prior` starts the bias at the class priors' log-odds (prior_bias), for the sigmoid focal loss."""
    if bias_init not in BIAS_INITS:
        raise ConfigError(f"model.head_args.bias_init must be one of {', '.join(BIAS_INITS)}; got '{bias_init}'")
    head = LinearHead(in_features, num_classes)
    if bias_init == "prior":
        with torch.no_grad():
            head.bias.copy_(prior_bias(class_counts))
    return head


@HEADS.register("cosine")
def cosine(in_features, num_classes, class_counts, gamma: float = 0.0):
    return CosineHead(in_features, num_classes, gamma)


@HEADS.register("lws")
def lws(in_features, num_classes, class_counts, bias: bool = False):
    return LWSHead(in_features, num_classes, bias)


@HEADS.register("cdt")
def cdt(in_features, num_classes, class_counts, tau: float = 0.1, attack_on: str = "raw"):
    return CDTHead(in_features, num_classes, class_counts, tau, attack_on)


@HEADS.register("tde")
def tde(in_features, num_classes, class_counts, gamma: float = 0.0, momentum: float = 0.9):
    return TDEHead(in_features, num_classes, gamma, momentum)


def build(name: str, in_features: int, num_classes: int, class_counts=None, **args):
    """A registered head by name for your own model: `build("cosine", 512, 10, gamma=1/32)`. Heads that need the
    training counts (LWS, CDT) take `class_counts`. Names: HEADS.names()."""
    counts = list(class_counts) if class_counts is not None else [1] * num_classes
    return HEADS.build(name, args, f"head '{name}'", in_features=in_features, num_classes=num_classes,
                       class_counts=counts)
