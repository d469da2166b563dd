"""A reference MARS with the official code's structure (PyTorch + scipy + sklearn), for comparison.

MARS: Wan et al., "A Malignity-Aware Backdoor Defense in Federated Learning", NeurIPS 2025,
arXiv:2509.20383. Written from the project's specification (mars_spec §1), not from the official
repository (which has no licence). It is what a user of the official code runs each round:

1. for every client: rebuild its model ``global + update`` (every state-dict entry, BatchNorm
   running statistics included) and walk ``named_modules()`` in order, remembering the last
   ``Conv2d``; at every ``BatchNorm2d``, for every output channel, ``torch.svd`` of the channel's
   kernel reshaped to ``C_in x kh*kw`` times ``|gamma / sqrt(var + 1e-5)|`` (NaN or negative
   running variance -> 0), a Python loop over channels; keep the values ``>= torch.quantile(., 0.95)``
   in channel order and concatenate the layers (the CBE vector);
2. the pairwise W1 matrix with ``scipy.stats.wasserstein_distance`` in a double loop (upper
   triangle, mirrored: the reference is not charged for symmetric pairs);
3. ``sklearn.cluster.KMeans(n_clusters=2, random_state=0, n_init=10)`` on the rows of that matrix;
4. cluster centers = elementwise means of the members' CBE vectors; accept everyone if their W1
   distance is ``<= 0.03``, else the cluster whose center has the smaller L1 norm (or, MARS*, the
   larger cluster).

:func:`cbe_batched` computes the same CBE with one batched ``torch.linalg.svdvals`` per layer; the
benchmark uses it for clients whose per-channel loop it does not time (and says so).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from sklearn.cluster import KMeans
from torch import nn

__all__ = [
    "ResNet18",
    "cbe_batched",
    "cbe_official",
    "detect",
    "load_client",
    "torch_name",
    "wasserstein_matrix_scipy",
]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (ImageNet stem), as the official CIFAR-10 configuration."""

    def __init__(self, num_classes: int = 10, widths=(64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(
                self, f"layer{i + 1}", nn.Sequential(BasicBlock(c, w, stride), BasicBlock(w, w, 1))
            )
            c = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_name(flax_path: tuple[str, ...]) -> str:
    """marsjax ResNet-18 module path -> torchvision module name."""
    out = []
    for part in flax_path:
        if part.startswith("layer") and "_" in part:
            stage, block = part.split("_")
            out += [stage, block]
        elif part == "downsample_conv":
            out += ["downsample", "0"]
        elif part == "downsample_bn":
            out += ["downsample", "1"]
        else:
            out.append(part)
    return ".".join(out)


def load_client(model: nn.Module, global_state: dict, update: dict) -> None:
    """``theta_i = theta_G + Delta_i`` for every entry of ``update`` (torch-named tensors)."""
    state = {k: global_state[k] + v for k, v in update.items()}
    model.load_state_dict(state, strict=False)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    var = bn.running_var.clone()
    var[torch.isnan(var) | (var < 0)] = 0.0
    return (bn.weight / torch.sqrt(var + bn.eps)).abs()


@torch.no_grad()
def cbe_official(model: nn.Module, u: float = 0.05) -> torch.Tensor:
    """CBE with the official loop structure: per-channel ``torch.svd`` in Python."""
    kept = []
    conv = None
    for _, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, nn.BatchNorm2d):
            scale = _bn_scale(module)
            weight = conv.weight
            lips = []
            for k in range(weight.shape[0]):
                m = weight[k].reshape(weight.shape[1], -1) * scale[k]
                lips.append(torch.svd(m)[1].max())
            lips = torch.stack(lips)
            thr = torch.quantile(lips, 1 - u)
            kept.append(lips[lips >= thr])
    return torch.cat(kept)


@torch.no_grad()
def cbe_batched(model: nn.Module, u: float = 0.05) -> torch.Tensor:
    """The same CBE with one batched ``torch.linalg.svdvals`` per layer (untimed helper)."""
    kept = []
    conv = None
    for _, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, nn.BatchNorm2d):
            w = conv.weight
            m = w.reshape(w.shape[0], w.shape[1], -1) * _bn_scale(module)[:, None, None]
            lips = torch.linalg.svdvals(m).amax(dim=-1)
            thr = torch.quantile(lips, 1 - u)
            kept.append(lips[lips >= thr])
    return torch.cat(kept)


def wasserstein_matrix_scipy(
    cbes: list[np.ndarray], pairs: int | None = None
) -> tuple[np.ndarray, int]:
    """Pairwise ``scipy.stats.wasserstein_distance`` in a double loop (upper triangle).

    Args:
      cbes: N vectors.
      pairs: stop after this many pairs (timing a subset); the rest of the matrix stays 0.

    Returns:
      ``([N, N] float64, number of pairs computed)``.
    """
    n = len(cbes)
    d = np.zeros((n, n))
    done = 0
    for i in range(n):
        for j in range(i + 1, n):
            if pairs is not None and done >= pairs:
                return d, done
            d[i, j] = d[j, i] = wasserstein_distance(cbes[i], cbes[j])
            done += 1
    return d, done


def detect(
    cbes: np.ndarray, d: np.ndarray, epsilon: float = 0.03, select: str = "min_l1"
) -> tuple[np.ndarray, np.ndarray]:
    """KMeans on the rows of ``d`` and MARS's selection. Returns ``(accepted bool[N], labels)``."""
    labels = KMeans(n_clusters=2, random_state=0, n_init=10).fit(d).labels_
    centers = [cbes[labels == c].mean(axis=0) for c in (0, 1)]
    if wasserstein_distance(centers[0], centers[1]) <= epsilon:
        return np.ones(len(cbes), bool), labels
    if select == "majority":
        keep = int(np.argmax(np.bincount(labels, minlength=2)))
    else:
        keep = int(np.argmin([np.abs(c).sum() for c in centers]))
    return labels == keep, labels
