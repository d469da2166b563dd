"""The PyTorch per-client federated round, written the way MARS / backdoors101 write it.

Used only for side-by-side comparison with marsjax's compiled round (``benchmarks/conv_impl.py``
imports it and times it in the same process as the JAX measurement). For each client of the round:
``copy.deepcopy`` the global model, build ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``, and for
each local epoch iterate over the client's own shard in shuffled mini-batches of 64 (the last one
partial, as ``DataLoader(drop_last=False)`` does), forward, cross-entropy, backward, step; then
collect the update ``local - global`` per parameter.

Two data paths:

* ``loader="dataloader"``: a ``torch.utils.data.DataLoader`` over a ``TensorDataset`` with a
  ``SubsetRandomSampler`` of the client's indices (what the official code does, minus its PIL
  transforms, which would only make it slower).
* ``loader="tensor"``: the shard is indexed directly with a shuffled permutation (the fastest way
  to feed a PyTorch loop; the conservative baseline to compare against).

The data are float32, already normalised, resident in memory (no decoding, no augmentation).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SimpleNet",
    "SmallResNet",
    "local_train",
    "make_model",
    "param_count",
    "run_round",
    "time_round",
]


class SimpleNet(nn.Module):
    """backdoors101 ``SimpleNet`` (MNIST): conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10.

    ``batch_norm=True`` adds ``BatchNorm2d`` after each conv (marsjax's ``SimpleNet(batch_norm=True)``;
    the convs then have no bias, as in marsjax).
    """

    def __init__(self, num_classes: int = 10, batch_norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1, bias=not batch_norm)
        self.conv2 = nn.Conv2d(20, 50, 5, 1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(20, momentum=0.1, eps=1e-5) if batch_norm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(50, momentum=0.1, eps=1e-5) if batch_norm else nn.Identity()
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2, 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2, 2)
        x = x.reshape(x.shape[0], -1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """A ResNet-18-shaped network (CIFAR stem, 2 blocks per stage) with configurable widths.

    ``widths=(64, 128, 256, 512)`` is torchvision-style ResNet-18 with the CIFAR stem (marsjax's
    ``ResNet18(stem="cifar")``); the benchmark uses narrower widths to stay cheap on a laptop CPU.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64, 128),
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(x.mean(dim=(2, 3)))


def make_model(name: str = "simplenet", **kwargs) -> nn.Module:
    """``"simplenet"``, ``"simplenet_bn"`` or ``"resnet"`` (a :class:`SmallResNet`)."""
    if name == "simplenet":
        return SimpleNet(batch_norm=False, **kwargs)
    if name == "simplenet_bn":
        return SimpleNet(batch_norm=True, **kwargs)
    if name == "resnet":
        return SmallResNet(**kwargs)
    raise ValueError(f"unknown model {name!r}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batches_tensor(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, batch: int, gen):
    perm = torch.from_numpy(idx)[torch.randperm(len(idx), generator=gen)].to(x.device)
    for s in range(0, len(perm), batch):
        b = perm[s : s + batch]
        yield x[b], y[b]


def local_train(
    global_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: np.ndarray,
    *,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    loader: str = "tensor",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One client's local training; returns ``{name: local - global}`` for every parameter."""
    model = copy.deepcopy(global_model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if loader == "dataloader":
        ds = torch.utils.data.TensorDataset(x, y)
        sampler = torch.utils.data.SubsetRandomSampler(idx.tolist(), generator=generator)
        dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler)
    elif loader != "tensor":
        raise ValueError(f"loader must be 'tensor' or 'dataloader', got {loader!r}")
    device = next(model.parameters()).device
    for _ in range(epochs):
        it = dl if loader == "dataloader" else _batches_tensor(x, y, idx, batch_size, generator)
        for xb, yb in it:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
    gparams = dict(global_model.named_parameters())
    with torch.no_grad():
        return {n: p.detach() - gparams[n].detach() for n, p in model.named_parameters()}


def run_round(
    global_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    client_idx: Sequence[np.ndarray],
    **kwargs,
) -> list[dict[str, torch.Tensor]]:
    """Every client of the round in turn (the official per-client loop)."""
    return [local_train(global_model, x, y, idx, **kwargs) for idx in client_idx]


def time_round(
    model_name: str = "simplenet",
    num_clients: int = 100,
    samples_per_client: int = 600,
    *,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    repeats: int = 3,
    seed: int = 0,
    model_kwargs: dict | None = None,
    device: str = "auto",
    **kwargs,
) -> dict:
    """Times whole rounds; returns median seconds per round and samples/s (samples x epochs).

    ``device="auto"`` trains on CUDA when available. With ``loader="tensor"`` the data set lives
    on that device; with ``"dataloader"`` it stays in host memory and each batch is copied over,
    as the official code does.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = num_clients * samples_per_client
    x = torch.from_numpy(rng.standard_normal((n, *image_shape), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, n)).long()
    client_idx = [
        np.arange(c * samples_per_client, (c + 1) * samples_per_client) for c in range(num_clients)
    ]
    if kwargs.get("loader", "tensor") == "tensor":
        x, y = x.to(device), y.to(device)
    model = make_model(model_name, **(model_kwargs or {})).to(device)
    gen = torch.Generator().manual_seed(seed)
    # Warm-up: a few clients (oneDNN primitive caches, allocator).
    run_round(model, x, y, client_idx[: min(3, num_clients)], generator=gen, **kwargs)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_round(model, x, y, client_idx, generator=gen, **kwargs)
        sync()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    epochs = kwargs.get("epochs", 2)
    return {
        "round_s": t,
        "round_s_all": times,
        "samples_per_s": n * epochs / t,
        "clients_per_s": num_clients / t,
        "torch_num_threads": torch.get_num_threads(),
        "torch_device": str(device),
        "param_count": param_count(model),
    }


if __name__ == "__main__":
    import json

    for name in ("simplenet", "simplenet_bn"):
        for loader in ("tensor", "dataloader"):
            r = time_round(name, 20, 600, repeats=2, loader=loader)
            print(json.dumps({"model": name, "loader": loader, **r}))
