"""Backdoor energy (BE) and concentrated backdoor energy (CBE) of a model's variables.

MARS (Wan et al., "MARS: A Malignity-Aware Backdoor Defense in Federated Learning", NeurIPS 2025,
arXiv:2509.20383) scores every output channel of every convolution by the upper bound of its channel
Lipschitz constant (UCLC, from CLP: Zheng et al., ECCV 2022): the largest singular value of the
channel's kernel reshaped to a ``C_in x (kh*kw)`` matrix, times the absolute gain ``|gamma / sigma|``
of the BatchNorm that follows the convolution (mars_spec §1.2). CBE keeps, per layer, the values at or
above the layer's ``1 - kappa`` quantile, in channel order, and concatenates the layers (§1.3).

Which layers are scored (``layers=``):

* ``"conv_bn"`` (the official code and the paper's default): every 2-D convolution (a 4-D
  ``kernel`` ``[kh, kw, C_in, C_out]``), with the gain of the BatchNorm that follows it folded in.
  The official code only visits convolutions that a BatchNorm follows; a convolution without one is
  scored here unscaled (mars_spec §6.6, the SecretFlow port's rule), so MARS also runs on the
  paper's MNIST network, which has no BatchNorm.
* ``"all"`` (the paper's "MARS (all-layers)", App. L.5): additionally every fully connected layer (a
  2-D ``kernel`` ``[in, out]``) as ONE value, the spectral norm of the whole matrix (with the gain of a
  BatchNorm that directly follows it folded into its columns). This is the SecretFlow port's rule,
  the only public implementation of the variant. A per-neuron alternative (row norms) would treat a
  fully connected layer like ``C_out`` 1x1 convolutions; we keep one value per layer.

How layers are found. A *layer* is a module whose params hold a ``kernel`` (4-D: convolution,
2-D: dense), or ``scale`` and ``bias`` with ``mean`` and ``var`` at the same path of ``batch_stats``
(a BatchNorm; LayerNorm and GroupNorm have no running statistics and are not BatchNorms). Each
BatchNorm is paired with the layer it follows, which must have as many output channels; a conv
without BatchNorm is scored unscaled, a BatchNorm that follows no conv or dense layer is not scored.
The result is an :class:`EnergyLayout`, a static tuple of paths. Which layer a BatchNorm follows
is decided in one of three ways:

1. ``module_order`` given (:func:`module_call_order`, the order in which the model calls its
   submodules, traced abstractly): the layers are walked in that order and each BatchNorm pairs
   with the layer right before it, as the official code walks ``named_modules()``. Always right.
2. No ``module_order``, and some dict of ``params`` lists its keys out of sorted order: JAX sorts
   the keys of every dict whenever it rebuilds a tree (``jax.tree.map``, ``jax.jit`` outputs,
   ``jax.eval_shape``, ``Module.lazy_init``, optax updates, checkpoint restores), so such a dict
   was not rebuilt and keeps the definition order of an eager ``Module.init`` (flax creates a
   BatchNorm's ``scale`` before its ``bias`` and a conv's ``kernel`` before its ``bias``, so any
   model with a BatchNorm or a biased conv shows it). The dict is walked as in 1.
3. Otherwise the order is unknown (a sorted dict, e.g. SimpleNet's ``bn1, bn2, conv1, conv2, fc1,
   fc2``), and pairs are found from names and channel counts alone, in this order:

   a. *Names*, among the modules of one parent: a BatchNorm whose name is a layer's name with one
      conv token (``conv``, ``Conv``, ``CONV``, not inside a word) replaced by a BatchNorm token
      (``bn``, ``BN``, ``norm``, ``Norm``, ``batchnorm``, ``batch_norm``, ``BatchNorm``), e.g.
      ``conv1``/``bn1``, ``downsample_conv``/``downsample_bn``, or the layer's name followed by a
      BatchNorm token (``stem``/``stem_bn``, ``conv1``/``conv1_norm``), when that match is one to
      one and the channel counts agree. Flax's automatic names (``Conv_0``, ``BatchNorm_0``: a
      class name and an index) are not names in this sense.
   b. *Flax automatic names*, among the modules of one parent: a BatchNorm follows the layer right
      before it, so in call order the i-th BatchNorm's layer comes after the (i-1)-th one's, and
      the pairing of the ``BatchNorm_<i>`` with the ``Conv_<j>`` (indices count calls per class)
      is an increasing map with matching channel counts. It is taken when exactly one such map
      exists and every unpaired sibling layer with a channel count of these BatchNorms is
      automatically named with one class: with as many convs as BatchNorms and matching counts,
      ``Conv_i`` pairs with ``BatchNorm_i`` (SimpleNet or a ResNet block with automatic names);
      ``Conv_0`` (16), ``Conv_1`` (16), ``BatchNorm_0`` (16) has two maps and is ambiguous.
   c. *A unique channel count*, anywhere in the model: a BatchNorm still unpaired whose channel
      count only one unpaired layer has, a layer that no other unpaired BatchNorm could take.

   A BatchNorm left unpaired while an unpaired conv or dense layer has its channel count, or a
   pair found by b or c while an unpaired layer with the same channel count remains (it could be
   that BatchNorm's layer instead), is ambiguous: :class:`AmbiguousLayoutError` (a
   ``ValueError``) is raised, never a value computed on a guessed pairing. (Unless no scored
   layer is involved: with ``layers="conv_bn"`` a BatchNorm that only a dense layer could take
   changes no value.) Rule 3 assumes that a
   BatchNorm normalises the output of the conv or dense layer of its channel count that its names
   (a) or its automatic-name position (b) point to, or the only one there is (c). The layers of a
   sorted dict come out in natural order of their paths (``Conv_2`` before ``Conv_10``): the call
   order of the convolutions of marsjax's SimpleNet and ResNet-18 (not of ResNet-18's ``fc``,
   which sorts before ``layer1_0``), not of every model.

   marsjax's SimpleNet (``conv1``/``bn1``) and ResNet-18 (``conv1``/``bn1``, ``conv2``/``bn2``,
   ``downsample_conv``/``downsample_bn`` in every block) pair by rule a, so their sorted dicts
   give the same values as their definition-order dicts. Rule 2 also raises
   :class:`AmbiguousLayoutError` when its walk leaves a BatchNorm unpaired while an unpaired
   scored layer has its channel count (a dict in neither definition nor sorted order; the old
   code only warned there). The error tells the way
   out, which never depends on dict order: compute the layout once, ``layout =
   energy_layout(variables, module_order=module_call_order(model, x))``, and pass
   ``backdoor_energy(variables, layout=layout)``.

BatchNorm running variance: flax's ``BatchNorm`` folds the biased batch variance (divided by
``n``, the values per channel in the batch) into its running average, PyTorch the unbiased one
(``n / (n - 1)`` times larger), so BE of the same model differs by at most about ``1 / (2 (n - 1))``.
Measured on SimpleNet with BatchNorm and one batch of 64 random 28x28x1 inputs (jax 0.10.2, flax
0.12.8): with the running variance equal to the batch variance the largest relative change of BE
over all channels is 1.2e-4 (0.012 %, at ``bn2``, ``n = 64 * 8 * 8 = 4096``; ``bn1``, ``n = 64 *
24 * 24``: 1.4e-5), and after one momentum-0.9 update from the initial variance of 1 it is 7.1e-6;
the 0.8 % bound ``1 / (2 * 63)`` would only be reached with one value per channel and sample (a
BatchNorm after a dense layer, batch 64). marsjax keeps flax's convention and does not convert.

How sigma_max is computed. The per-channel matrices are thin (``C_in x 9`` for 3x3 kernels), so we
form each channel's Gram matrix on the small side (``9 x 9``; ``3 x 3`` for an RGB stem; ``1 x 1``,
i.e. a squared vector norm, for 1x1 kernels) and take ``sqrt`` of its largest eigenvalue, from ONE
batched ``jnp.linalg.eigvalsh`` per distinct Gram size. (Below, the Gram matrices of the
``"channel_major"`` form; the flax-layout forms, ``"pairs"`` the CPU default, are described
after the squaring method.)
The flax ``[kh, kw, C_in, C_out]`` kernel is brought to ``[C_out, kh*kw, C_in]`` by one 2-D
transpose (XLA:CPU runs it about 3x faster than the
equivalent 3-D permutation, and a Gram product contracting a non-minor axis ran 6x slower still).
Measured on the 4,800 conv channels of ResNet-18 (``benchmarks/bench_mars.py``, case
``sigma_max_method``, 2-core AMD EPYC VM shared with other jobs, jax 0.10.2, 2026-11-26; process
CPU time, which the sharing distorts less than wall time): batched ``jnp.linalg.svd`` per layer
129 ms, Gram + eigvalsh 30 ms (4.3x less), the whole BE step from the flax kernels (layout change
included) 52 ms; under ``vmap`` over 8 clients 126 vs 47 ms per client. Accuracy: the error of the
LARGEST eigenvalue of a symmetric matrix is bounded by ``||dG|| <= c * eps * ||G||`` and
``||G|| = lambda_max``, so squaring the condition number only costs accuracy in the small singular
values, which we do not use. Max relative error vs float64 numpy SVD: 3.8e-7 (batched float32 SVD:
5.0e-7); the tests also check rank-1, nearly rank-1 and 7-decade ill-conditioned channels to 1e-5.
The Gram product runs at ``Precision.HIGHEST`` (no TF32 passes on GPUs).

Without LAPACK (``method="squaring"``; the eigvalsh path above stays the default and the tests'
reference). Each Gram matrix is divided by its trace and squared ``NUM_SQUARINGS`` (18) times,
rescaled to unit Frobenius norm after every fourth product and the last, which leaves a
multiple of ``G^q`` with ``q = 2^18``; the Rayleigh quotient ``<G, B>_F / tr(B)`` of that matrix
is a weighted mean of ``G``'s eigenvalues with weights ``lambda_i^q``. Equal top singular values
cost nothing (their eigenvalues all equal ``lambda_max``), and the worst spectrum (the others just below the top,
about ``1 - 1/q``) loses about ``1.04 / q = 4e-6``. All Grams of one size go through the
squarings as one batch of plain matrix products, which XLA runs on any backend (TPUs have no
batched eigensolver worth the name). Accuracy against float64 ``np.linalg.norm(ord=2)``: random
kernels 1.8e-7; channels with 2, 3 or 9 equal top singular values, top-two gaps from 1e-8 to
1e-2, eight values a hair below the top, rank 1, seven decades, 1e-12 and 1e12 scales: at most
1.6e-6 over 30 draws (eigvalsh: 1.1e-7; ``tests/defenses/test_energy_squaring.py``). The same
Gram layout feeds both methods; on ResNet-18's conv channels (2-core VM under load, so only the
ratio means much) the eigenvalue step took 9 ms per client for 16 squarings against 21 ms for the
batched ``eigvalsh``, while the channel-major transpose and Gram products took about 45 ms in the
same program (14 ms for the products alone on a pre-transposed operand). ``benchmarks/bench_mars.py``
measures both methods side by side.

Three ways to form the Gram matrices (``gram_form``; same values up to float32 rounding, all
tested against float64 numpy). ``"channel_major"``: the transpose to ``[C_out, kh*kw, C_in]``
above and one batched ``einsum`` (``Precision.HIGHEST``), the default on every backend but the
CPU (the GPU numbers of ``benchmarks/results/mars_cost_gpu.jsonl`` were made with it; nothing was
measured on a TPU). ``"pairs"``: no transpose; in the flax layout ``m = [d, n, C_out]`` (``d``
the small side), each of the ``d (d + 1) / 2`` distinct entries is its own reduction
``sum(m[a] * m[b], axis=0)``, a product along the contiguous channel axis that XLA:CPU
vectorises (the default on CPU); each of the 45 reductions reads its two rows of ``m`` again, so
the kernel is read about 10 times. ``"reduce"``: the same ``d (d + 1) / 2`` products as the
operands of ONE variadic ``lax.reduce`` over ``n``, so that XLA:CPU can emit a single loop over
``m`` (inferred from its speed below, not read from the compiled code). Both flax-layout forms
are used up to ``d = PAIRS_MAX_SIDE`` = 9 (45 products); larger Grams, e.g. a 5x5 kernel on 20
input channels, use ``"channel_major"``. Not used: the same Gram as one broadcast product
``sum(m[:, None] * m[None, :], axis=2)``, slightly faster still, which jaxlib 0.10.2 compiles into an XNNPACK ("ynn") fusion that returns wrong values (relative
errors from 1 to 1e8) under ``vmap`` with a client axis of size 1 (seen for ``[3, 3, 64, 32]``,
``[7, 7, 3, 64]``, ``[5, 5, 20, 50]`` and ``[3, 3, 512, 512]`` kernels; 2 and 3 clients were
right), so which programs it breaks cannot be told in advance; the pairs and reduce forms were
exact in the same cases (``tests/defenses/test_energy.py::test_gram_forms_match_numpy_under_vmap``).
Measured side by side with the other formulations tried (tiled matrix products, a ``C_in``-major layout,
elementwise squaring in a structure-of-arrays layout) in ``benchmarks/mars_gram_forms.py``
(ResNet-18's 4,800 conv channels, 10 clients under ``vmap``, quiet 2-core CPU, 2026-12-01, per
client): the Gram step 23.6 ms as pairs against 48.7 ms channel-major; the whole BE step with
``eigvalsh`` 44.2 against 73.5 ms, with squaring 30.3 against 55.2 ms. The reduce form, same
script and machine, later that day: at 10 clients the Gram 15.0 ms against pairs 22.3, BE with
squaring 25.5 against 29.4; at 100 clients in one ``vmap`` BE with squaring 24.6 against 36.0
ms, but in ``lax.map`` chunks of 10 (as ``mars(chunk_size=10)``) 24.4 against 25.6, its Gram
slower (18.1 against 14.5 ms). In ``benchmarks/bench_mars.py`` (whole CBE, 100 clients in
chunks of 10, commit 5433b86, when ``"reduce"`` was the CPU default) it was slower than pairs
(squaring 3.80 against 3.34 s per round, eigvalsh 5.20 against 4.76 s), hence pairs stays the
default and ``"reduce"`` an option. With all 100 clients in one ``vmap`` (``--chunk 100``,
commit 433aa00) reduce was slower there too: squaring 3.93 against 3.64 s, eigvalsh 6.80 against
5.39 s. Also tried and not adopted: the pairs Gram over 64-row slices of the reduction axis in a
``fori_loop`` (cases ``*_blocked64`` of ``benchmarks/mars_gram_forms.py``, commit 11f4802, idle
2-core Xeon, 10 clients: the Gram 13.3 against 21.3 ms per client, the BE step with squaring 19.3
against 25.7 ms); inside ``benchmarks/bench_mars.py`` (100 clients in chunks of 10, the same day,
timed with the blocked form patched in, not a committed result) the round got slower instead,
3.34-3.45 against 3.04-3.13 s.

Range: the fast path forms squares in float32, so kernels with entries beyond about ``1e15`` give a
non-finite value (NaN/inf, never a wrong finite one; MARS then drops the client) and entries below
about ``1e-15`` lose accuracy. ``rescale=True`` divides each channel by its largest entry first
(exact for any finite kernel, about 1.6x the cost).

Two jaxlib 0.10.2 CPU problems met on the way, worth knowing elsewhere: (1) independent batched
``eigvalsh`` calls inside one jitted program can deadlock XLA's intra-op thread pool (each LAPACK
kernel blocks a pool thread while waiting for its own parts; see ``_max_eig_grouped``), hence one
call per Gram size and the calls chained by a data dependency; (2) ``jnp.linalg.svd`` of an
operand produced by a reshape/transpose inside the same jit (e.g.
``svd(k.reshape(-1, c).T.reshape(c, 9, -1))`` with ``k`` a jit argument of shape
``[3, 3, 16, 16]`` or larger) returned wrong singular values (relative errors from 1 to 1e29);
the Gram path feeds ``eigvalsh`` a freshly computed symmetric matrix and is checked end to end
against numpy in the tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.types import Variables

__all__ = [
    "BN_EPSILON",
    "ENERGY_METHODS",
    "GRAM_FORMS",
    "NUM_SQUARINGS",
    "PAIRS_MAX_SIDE",
    "SQUARINGS_PER_SCALE",
    "AmbiguousLayoutError",
    "EnergyLayer",
    "EnergyLayout",
    "EnergyMethod",
    "GramForm",
    "backdoor_energy",
    "cbe_counts",
    "cbe_size",
    "channel_spectral_norms",
    "concentrated_backdoor_energy",
    "energy_layout",
    "layout_channel_counts",
    "module_call_order",
]

BN_EPSILON = 1e-5
Path = tuple[str, ...]
LayerSelection = Literal["conv_bn", "all"]
EnergyMethod = Literal["eigvalsh", "squaring"]
ENERGY_METHODS = ("eigvalsh", "squaring")
GramForm = Literal["reduce", "pairs", "channel_major"]
GRAM_FORMS = ("reduce", "pairs", "channel_major")
PAIRS_MAX_SIDE = 9
NUM_SQUARINGS = 18
SQUARINGS_PER_SCALE = 4


class EnergyLayer(NamedTuple):
    """One scored layer.

    Attributes:
      kind: ``"conv"`` (4-D kernel, one value per output channel) or ``"dense"`` (2-D kernel, one
        value for the layer).
      path: path of the layer's module inside ``params`` (its ``kernel`` is ``params[path]["kernel"]``).
      norm: path of the paired BatchNorm (``params[norm]["scale"]``, ``batch_stats[norm]["var"]``), or
        ``None``: the layer is scored unscaled.
      num_values: how many BE values the layer yields (``C_out`` for a conv, 1 for a dense layer).
    """

    kind: str
    path: Path
    norm: Path | None
    num_values: int


EnergyLayout = tuple[EnergyLayer, ...]


def _collections(variables: Variables) -> tuple[Mapping, Mapping]:
    if isinstance(variables, Mapping) and "params" in variables:
        return variables["params"], variables.get("batch_stats", {}) or {}
    if isinstance(variables, Mapping):
        return variables, {}
    raise TypeError(f"expected a flax variables dict, got {type(variables).__name__}")


def _get(tree: Mapping, path: Path) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "ndim")


def module_call_order(
    model: Any, *args: Any, method: Any = None, **kwargs: Any
) -> tuple[Path, ...]:
    """The order in which a flax linen model calls its submodules, without running it.

    Traces ``model.init(jax.random.key(0), *args, **kwargs)`` under :func:`jax.eval_shape` and records
    each submodule's path the first time it is called.

    Args:
      model: a ``flax.linen.Module``.
      *args: the example inputs of ``model.init`` after the key (arrays or ``jax.ShapeDtypeStruct``).
      method: optional method to init with (default ``__call__``).
      **kwargs: keyword arguments of the call (e.g. ``train=False``).

    Returns:
      Module paths (tuples of names, relative to the params root) in first-call order.
    """
    import flax.linen as nn

    order: list[Path] = []
    seen: set[Path] = set()

    def interceptor(next_fun, fn_args, fn_kwargs, context):
        path = tuple(str(p) for p in context.module.path)
        if path not in seen:
            seen.add(path)
            order.append(path)
        return next_fun(*fn_args, **fn_kwargs)

    def init(*a):
        with nn.intercept_methods(interceptor):
            return model.init(jax.random.key(0), *a, method=method, **kwargs)

    jax.eval_shape(init, *args)
    return tuple(order)


def _collect_layers(params: Mapping, stats: Mapping) -> list[tuple[str, Path, int]]:
    """(kind, path, out_features) of every candidate layer, in the dict's iteration order."""
    found: list[tuple[str, Path, int]] = []

    def walk(node: Mapping, path: Path) -> None:
        kernel = node.get("kernel")
        if _is_array(kernel) and kernel.ndim == 4:
            found.append(("conv", path, int(kernel.shape[-1])))
        elif _is_array(kernel) and kernel.ndim == 2:
            found.append(("dense", path, int(kernel.shape[-1])))
        elif _is_array(node.get("scale")) and _is_array(node.get("bias")):
            bn_stats = _get(stats, path)
            is_bn = isinstance(bn_stats, Mapping) and _is_array(bn_stats.get("var"))
            if is_bn and _is_array(bn_stats.get("mean")):
                found.append(("bn", path, int(node["scale"].shape[-1])))
        for name, child in node.items():
            if isinstance(child, Mapping):
                walk(child, path + (str(name),))

    walk(params, ())
    return found


class AmbiguousLayoutError(ValueError):
    """The variables dict does not tell which layer a BatchNorm follows; pass a layout instead."""


_HOW_TO = (
    "Compute the layout once from the model, in the order it calls its layers, and pass it: "
    "layout = energy_layout(variables, module_order=module_call_order(model, x)) with x an "
    "example input (e.g. jax.ShapeDtypeStruct((1, H, W, C), jnp.float32)), then "
    "backdoor_energy(variables, layout=layout) (MARS: mars(layout=layout), or "
    "model_energy_layout(model, x) from marsjax.mars)."
)

# Rule 3a/3b tokens (see the module docstring); "not inside a word" = no letter on either side.
_CONV_TOKEN = re.compile(r"(?<![A-Za-z])(?:conv|Conv|CONV)(?![A-Za-z])")
_BN_WORDS = r"(?:batch_norm|batchnorm|BatchNorm|bn|BN|norm|Norm)"
_BN_TOKEN = re.compile(r"(?<![A-Za-z])" + _BN_WORDS + r"(?![A-Za-z])")
_BN_SUFFIX = re.compile(r"^(.+?)[_.\-]?(?<![A-Za-z])" + _BN_WORDS + r"$")
_AUTO_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*)_(\d+)$")  # flax: f"{type(module).__name__}_{i}"

_Entry = tuple[str, Path, int]  # (kind, path, out_features), as _collect_layers yields


def _path_str(path: Path) -> str:
    return "params/" + "/".join(path) if path else "params"


def _natural_key(path: Path) -> tuple:
    """Sort key comparing digit runs as numbers: ``Conv_2`` before ``Conv_10``."""
    return tuple(
        tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", n)
        )
        for n in path
    )


def _keys_sorted(params: Mapping) -> bool:
    """Whether every dict of ``params`` lists its keys in sorted order (as JAX rebuilds them)."""
    stack = [params]
    while stack:
        node = stack.pop()
        keys = list(node.keys())
        try:
            if keys != sorted(keys):
                return False
        except TypeError:  # keys JAX could not sort either
            return False
        stack.extend(child for child in node.values() if isinstance(child, Mapping))
    return True


def _pair_adjacent(found: Sequence[_Entry]) -> tuple[dict[Path, Path], list[_Entry]]:
    """Rules 1 and 2: each BatchNorm pairs with the unpaired layer right before it in ``found``."""
    pairs: dict[Path, Path] = {}
    unpaired: list[_Entry] = []
    prev: _Entry | None = None
    for entry in found:
        kind, path, feats = entry
        if kind == "bn":
            if prev is not None and prev[2] == feats:
                pairs[prev[1]] = path
            else:
                unpaired.append(entry)
            prev = None  # a BatchNorm (paired or not) ends the run
            continue
        prev = entry
    return pairs, unpaired


def _name_key(name: str, token: re.Pattern) -> str | None:
    """``name`` with its single ``token`` replaced by a marker; None without exactly one."""
    hits = list(token.finditer(name))
    if len(hits) != 1:
        return None
    return name[: hits[0].start()] + "\0" + name[hits[0].end() :]


def _names_match(layer: str, bn: str) -> bool:
    """Rule 3a: ``conv1``/``bn1``, ``downsample_conv``/``downsample_bn``, ``stem``/``stem_bn``."""
    key = _name_key(layer, _CONV_TOKEN)
    if key is not None and key == _name_key(bn, _BN_TOKEN):
        return True
    m = _BN_SUFFIX.match(bn)
    return m is not None and m.group(1) == layer


def _auto_name(name: str) -> tuple[str, int] | None:
    m = _AUTO_NAME.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def _increasing_maps(bns: Sequence[int], layers: Sequence[int], limit: int = 2) -> list[list[int]]:
    """Up to ``limit`` strictly increasing maps ``i -> j`` with ``bns[i] == layers[j]``."""
    out: list[list[int]] = []

    def extend(i: int, j0: int, chosen: list[int]) -> None:
        if len(out) >= limit:
            return
        if i == len(bns):
            out.append(list(chosen))
            return
        for j in range(j0, len(layers)):
            if layers[j] == bns[i]:
                chosen.append(j)
                extend(i + 1, j + 1, chosen)
                chosen.pop()

    extend(0, 0, [])
    return out


def _pair_by_rules(found: Sequence[_Entry], scored: set[str]) -> dict[Path, Path]:
    """Rule 3 (the dict's order is unknown): pairs from names and channel counts, or raises.

    It raises only where a guess could change a scored value: a layer of a kind in ``scored``
    (``{"conv"}`` or ``{"conv", "dense"}``) whose BatchNorm is unsure.
    """
    feats = {path: f for _, path, f in found}
    kinds = {path: kind for kind, path, _ in found}
    layers = [path for kind, path, _ in found if kind != "bn"]
    bns = [path for kind, path, _ in found if kind == "bn"]
    pairs: dict[Path, Path] = {}  # layer -> BatchNorm
    inferred: list[tuple[Path, Path, str]] = []  # (layer, bn, rule) found by 3b or 3c
    if not bns:
        return pairs

    def siblings(paths: list[Path]) -> dict[Path, list[Path]]:
        groups: dict[Path, list[Path]] = {}
        for path in paths:
            if path:
                groups.setdefault(path[:-1], []).append(path)
        return groups

    # 3a: names, one to one, same channel count.
    layer_groups = siblings(layers)
    for parent, group in siblings(bns).items():
        cands: dict[Path, list[Path]] = {}
        for b in group:
            if _auto_name(b[-1]):
                continue
            cands[b] = [
                lay
                for lay in layer_groups.get(parent, [])
                if not _auto_name(lay[-1])
                and feats[lay] == feats[b]
                and _names_match(lay[-1], b[-1])
            ]
        for b, ls in cands.items():
            if len(ls) == 1 and sum(ls[0] in other for other in cands.values()) == 1:
                pairs[ls[0]] = b

    # 3b: flax automatic names, the unique increasing map of one parent.
    def free_layers() -> list[Path]:
        return [lay for lay in layers if lay not in pairs]

    def free_bns() -> list[Path]:
        taken = set(pairs.values())
        return [b for b in bns if b not in taken]

    layer_groups = siblings(free_layers())
    for parent, group in siblings(free_bns()).items():
        auto = [(_auto_name(b[-1]), b) for b in group]
        auto = sorted((a, b) for a, b in auto if a is not None)
        if not auto or len({a[0] for a, _ in auto}) != 1:
            continue
        counts = {feats[b] for _, b in auto}
        rivals = [lay for lay in layer_groups.get(parent, []) if feats[lay] in counts]
        named = [(_auto_name(lay[-1]), lay) for lay in rivals]
        if not named or any(a is None for a, _ in named) or len({a[0] for a, _ in named}) != 1:
            continue
        named.sort()
        maps = _increasing_maps([feats[b] for _, b in auto], [feats[lay] for _, lay in named])
        if len(maps) == 1:
            for (_, b), j in zip(auto, maps[0]):
                pairs[named[j][1]] = b
                inferred.append((named[j][1], b, "flax automatic names"))

    # 3c: a channel count that only one unpaired layer and one unpaired BatchNorm have.
    layers_left, bns_left = free_layers(), free_bns()
    for b in bns_left:
        ls = [lay for lay in layers_left if feats[lay] == feats[b]]
        if len(ls) == 1 and sum(feats[o] == feats[b] for o in bns_left) == 1:
            pairs[ls[0]] = b
            inferred.append((ls[0], b, "the only layer with its channel count"))

    # Anything a guess could have got wrong in a scored layer raises.
    layers_left = free_layers()
    problems = []
    for b in free_bns():
        rivals = [lay for lay in layers_left if feats[lay] == feats[b]]
        if any(kinds[lay] in scored for lay in rivals):
            problems.append(
                f"BatchNorm {_path_str(b)} ({feats[b]} channels) could follow "
                + " or ".join(_path_str(lay) for lay in rivals)
            )
    for lay, b, rule in inferred:
        rivals = [o for o in layers_left if feats[o] == feats[b]]
        if rivals and any(kinds[o] in scored for o in [lay, *rivals]):
            problems.append(
                f"BatchNorm {_path_str(b)} ({feats[b]} channels) pairs with {_path_str(lay)} by "
                f"{rule}, but could follow " + " or ".join(_path_str(o) for o in rivals)
            )
    if problems:
        raise AmbiguousLayoutError(
            "backdoor energy: the variables dict is in sorted key order, the definition order is "
            "lost (JAX sorts dict keys whenever it rebuilds a tree: jax.tree.map, jit outputs, "
            "jax.eval_shape, optax updates, checkpoint restores), and names and channel counts "
            "do not tell which layer each BatchNorm follows: "
            + "; ".join(problems)
            + ". "
            + _HOW_TO
        )
    return pairs


def energy_layout(
    variables: Variables,
    *,
    layers: LayerSelection = "conv_bn",
    module_order: Sequence[Path] | None = None,
    warn: bool = True,
) -> EnergyLayout:
    """Finds the scored layers of a flax variables dict and pairs each conv with its BatchNorm.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of ONE model (no client axis); arrays or
        ``jax.ShapeDtypeStruct``.
      layers: ``"conv_bn"`` or ``"all"`` (see the module docstring).
      module_order: optional module paths in call/definition order (:func:`module_call_order`);
        layers are visited in that order (those missing from it last, in dict order) and each
        BatchNorm pairs with the layer right before it. Without it, a dict in definition order
        is walked in its own order and a sorted one is paired by names and channel counts (the
        module docstring's rules 2 and 3).
      warn: ignored, kept for compatibility: a BatchNorm that cannot be paired with certainty now
        raises :class:`AmbiguousLayoutError` instead of a warning.

    Returns:
      The static :data:`EnergyLayout`.

    Raises:
      AmbiguousLayoutError: (a ``ValueError``) without ``module_order``, when the dict does not
        tell which layer a BatchNorm follows; the message says how to pass ``module_order``.
    """
    del warn
    if layers not in ("conv_bn", "all"):
        raise ValueError(f"layers must be 'conv_bn' or 'all', got {layers!r}")
    params, stats = _collections(variables)
    found = _collect_layers(params, stats)
    scored = {"conv"} if layers == "conv_bn" else {"conv", "dense"}
    if module_order is not None:  # rule 1
        rank = {tuple(str(p) for p in path): i for i, path in enumerate(module_order)}
        big = len(rank)
        found = sorted(found, key=lambda f: rank.get(f[1], big))  # stable: unknown keep dict order
        pairs, _ = _pair_adjacent(found)
    elif not _keys_sorted(params):  # rule 2: definition order
        pairs, unpaired = _pair_adjacent(found)
        free = [f for f in found if f[0] in scored and f[1] not in pairs]
        problems = [
            f"BatchNorm {_path_str(path)} ({n} channels) follows no layer of its channel count "
            "in the dict's order, while layers of that count have none: "
            + ", ".join(_path_str(f[1]) for f in free if f[2] == n)
            for _, path, n in unpaired
            if any(f[2] == n for f in free)
        ]
        if problems:
            raise AmbiguousLayoutError(
                "backdoor energy: the variables dict is neither sorted nor, it seems, in "
                "definition order: " + "; ".join(problems) + ". " + _HOW_TO
            )
    else:  # rule 3: sorted, order unknown
        found = sorted(found, key=lambda f: _natural_key(f[1]))
        pairs = _pair_by_rules(found, scored)

    out = [
        EnergyLayer(kind, path, pairs.get(path), feats if kind == "conv" else 1)
        for kind, path, feats in found
        if kind in scored
    ]
    return tuple(out)


def layout_channel_counts(layout: EnergyLayout) -> tuple[int, ...]:
    """Number of BE values of each layer of ``layout``."""
    return tuple(layer.num_values for layer in layout)


def _bn_gain(scale: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """``|gamma / sqrt(running_var + eps)|`` with NaN or negative running_var taken as 0."""
    var = var.astype(jnp.float32)
    var = jnp.where(jnp.isnan(var) | (var < 0), 0.0, var)
    return jnp.abs(scale.astype(jnp.float32) / jnp.sqrt(var + eps))


def _max_eig_grouped(grams: list[jax.Array]) -> list[jax.Array]:
    """``lambda_max`` of each ``[..., d, d]`` PSD batch, one ``eigvalsh`` call per distinct ``d``.

    The calls run one after the other, the largest batch first: each later call's operand takes
    a data dependency on the previous call's result (a ``where`` between the operand and its
    transpose, which ``eigvalsh`` treats alike, keyed on the previous result, so the compiler
    cannot fold it away; ``lax.optimization_barrier`` is not enough, XLA:CPU drops it before its
    thunk executor runs independent ops concurrently). On XLA:CPU the LAPACK kernel of a large
    batched ``eigvalsh`` splits the batch over the intra-op thread pool and blocks its own pool
    thread until the parts finish; two such calls running at once on a 2-thread pool each hold a
    thread and wait for parts that no thread is left to run. Seen with jaxlib 0.10.2: MARS on
    ResNet-18 with 40 clients (a 3x3 and a 9x9 Gram group) hung with both pool threads in
    ``EigenvalueDecompositionSymmetric::Kernel``; ``tests/defenses/test_energy.py`` runs that case
    in a subprocess with a timeout.
    """
    out: list[jax.Array | None] = [None] * len(grams)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        by_size.setdefault(g.shape[-1], []).append(i)
    for i in by_size.pop(1, []):
        out[i] = grams[i][..., 0, 0]
    order = sorted(by_size, key=lambda d: -sum(grams[i].size for i in by_size[d]))
    previous = None
    for d in order:
        idx = by_size[d]
        flat = [grams[i].reshape((-1, d, d)) for i in idx]
        sizes = [f.shape[0] for f in flat]
        operand = jnp.concatenate(flat, axis=0) if len(flat) > 1 else flat[0]
        if previous is not None:  # serialise the LAPACK calls (see above)
            # ``eigvalsh`` symmetrises its input, ``(x + x^T) / 2``, so both branches give the
            # same bits whatever ``previous`` holds; only the dependency matters. (A branch that
            # is the same expression, e.g. ``operand * 1``, gets folded away with the dependency.)
            flip = jnp.isnan(jnp.sum(previous))
            operand = jnp.where(flip, jnp.swapaxes(operand, -1, -2), operand)
        lam = jnp.linalg.eigvalsh(operand)[:, -1]
        previous = lam
        start = 0
        for i, n in zip(idx, sizes):
            out[i] = lam[start : start + n].reshape(grams[i].shape[:-2])
            start += n
    return out  # type: ignore[return-value]


def _gram(m: jax.Array) -> jax.Array:
    """Gram matrices of ``m`` ``[n, a, b]`` on the smaller side: ``[n, min(a, b), min(a, b)]``."""
    hi = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators
    if m.shape[1] <= m.shape[2]:
        return jnp.einsum("nai,nbi->nab", m, m, precision=hi)
    return jnp.einsum("nia,nib->nab", m, m, precision=hi)


def _squared_lambda(g: jax.Array, num_squarings: int) -> jax.Array:
    """``lambda_max`` of each ``[..., d, d]`` PSD matrix by repeated squaring (see below)."""
    hi = jax.lax.Precision.HIGHEST
    t0 = jnp.trace(g, axis1=-2, axis2=-1)
    # the first scale by the trace (the Gram's entries may be near float32's range limits),
    # then by the Frobenius norm of a matrix whose entries are at most 1
    b = g / jnp.where(t0 > 0, t0, 1.0)[..., None, None]
    for i in range(num_squarings):
        b = jnp.matmul(b, b, precision=hi)
        if (i + 1) % SQUARINGS_PER_SCALE == 0 or i == num_squarings - 1:
            f = jnp.sqrt(jnp.sum(b * b, axis=(-2, -1)))
            b = b / jnp.where(f > 0, f, 1.0)[..., None, None]
    t = jnp.trace(b, axis1=-2, axis2=-1)
    lam = jnp.sum(g * b, axis=(-2, -1)) / jnp.where(t > 0, t, 1.0)
    return jnp.where(jnp.isfinite(t0), lam, jnp.nan)  # an overflowing trace: NaN, not 0


def _max_eig_squaring(grams: list[jax.Array], num_squarings: int) -> list[jax.Array]:
    """``lambda_max`` of each ``[..., d, d]`` PSD batch by repeated squaring, no LAPACK.

    ``B = G / tr(G)``, then ``num_squarings`` times ``B <- B @ B``, rescaled to unit Frobenius
    norm after every ``SQUARINGS_PER_SCALE``-th product and after the last, so ``B`` is
    ``G^q / ||G^q||_F`` with ``q = 2^num_squarings``: the eigenvectors of ``G`` weighted by
    ``lambda_i^q``. The result is the Rayleigh
    quotient of that matrix, ``<G, B>_F / tr(B) = sum_i w_i lambda_i`` with
    ``w_i = lambda_i^q / sum_j lambda_j^q``, which is at most
    ``lambda_max`` and misses it by ``sum_i w_i (lambda_max - lambda_i)``: eigenvalues equal to
    ``lambda_max`` (degenerate top singular values) cost nothing, far ones vanish, and the worst
    case (eight others at ``lambda_max (1 - 1 / q)``-ish) is about ``1.04 / q`` relative (4e-6
    with the default 18 squarings), on top of float32 rounding. Between two rescalings the
    largest eigenvalue of ``B`` stays above ``9^-16`` (after the trace scaling it is at least
    ``1/9``, after a Frobenius one at least ``1/3``; four squarings raise it to the 16th power),
    far from float32's underflow; only eigenvalues that no longer matter underflow. On the 30
    draws of near-degenerate, rank-one, ill-conditioned and extreme-scale channels described in
    the module docstring the largest relative error against float64 SVD was 1.67e-6 both with
    this rescaling and with the earlier one after every product (eigvalsh: 3.6e-7 on the same
    draws). Every step is a plain batched matrix product (all Grams of one size in one batch),
    which suits accelerators without an eigensolver too. A zero Gram gives 0, a non-finite one
    NaN.

    Rescaling after every fourth product instead of after each saves about a tenth of the BE
    step: on ResNet-18's 4,800 conv channels of 10 clients under ``vmap``
    (``benchmarks/mars_gram_forms.py``, cases ``pairs_squaring`` and ``pairs_squaring_prev``,
    ``benchmarks/results/mars_gram_forms_cpu.jsonl``, idle 2-core Xeon, jax 0.10.2, commit
    ab2ee01, two runs) 25.5-25.9 against 28.4-29.4 ms per client, of which the Gram step takes
    21.4 ms (commit c6555a8). Running the squarings in ``lax.map`` blocks of 2,048 Grams as
    well, so that each block stays in cache (commit 6f47639, same script and machine), gave 26.2
    against 27.6 ms: no gain inside the BE program, so the batch stays one.
    """
    out: list[jax.Array | None] = [None] * len(grams)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        by_size.setdefault(g.shape[-1], []).append(i)
    for i in by_size.pop(1, []):
        out[i] = grams[i][..., 0, 0]
    for d, idx in by_size.items():
        # one batch per Gram size, the client (vmap) axes kept in front
        flat = [grams[i].reshape((*grams[i].shape[:-3], -1, d, d)) for i in idx]
        g = jnp.concatenate(flat, axis=-3) if len(flat) > 1 else flat[0]
        lam = _squared_lambda(g, num_squarings)
        start = 0
        for i, f in zip(idx, flat):
            n = f.shape[-3]
            out[i] = lam[..., start : start + n].reshape(grams[i].shape[:-2])
            start += n
    return out  # type: ignore[return-value]


def _check_method(method: str) -> None:
    if method not in ENERGY_METHODS:
        raise ValueError(f"method must be one of {ENERGY_METHODS}, got {method!r}")


def _scaled(m: jax.Array, axes: tuple[int, ...], rescale: bool):
    """``m`` in float32, divided by its largest entry over ``axes`` when ``rescale``, and that
    factor (``None`` without ``rescale``)."""
    m = m.astype(jnp.float32)
    if not rescale:
        return m, None
    s = jnp.max(jnp.abs(m), axis=axes, keepdims=True)
    m = m / jnp.where((s > 0) & jnp.isfinite(s), s, 1.0)
    return m, s.reshape(-1)


def _sigmas(lams: list[jax.Array], factors: list[jax.Array | None]) -> list[jax.Array]:
    out = []
    for s, lam in zip(factors, lams):
        sigma = jnp.sqrt(jnp.maximum(lam, 0.0))
        out.append(sigma if s is None else s * sigma)
    return out


def _max_eig(grams: list[jax.Array], method: str, num_squarings: int) -> list[jax.Array]:
    if method == "eigvalsh":
        return _max_eig_grouped(grams)
    return _max_eig_squaring(grams, num_squarings)


def _matrix_norms(
    mats: Sequence[jax.Array],
    rescale: bool,
    method: EnergyMethod = "eigvalsh",
    num_squarings: int = NUM_SQUARINGS,
) -> list[jax.Array]:
    """sigma_max of every matrix of each ``[n, a, b]`` batch (one eigvalsh per Gram size, or
    repeated squaring: ``method``)."""
    _check_method(method)
    grams, factors = [], []
    for m in mats:
        m, s = _scaled(m, (1, 2), rescale)
        grams.append(_gram(m))
        factors.append(s)
    return _sigmas(_max_eig(grams, method, num_squarings), factors)


def _conv_norms(
    kernels: Sequence[jax.Array],
    rescale: bool,
    method: str,
    num_squarings: int,
    gram_form: GramForm | None = None,
) -> list[jax.Array]:
    """sigma_max of every output channel of each flax conv kernel: the Gram matrices
    (:func:`_conv_grams`), then ``method``."""
    grams, factors = _conv_grams(kernels, rescale, gram_form)
    return _sigmas(_max_eig(grams, method, num_squarings), factors)


def _resolve_gram_form(gram_form: GramForm | None, side: int) -> GramForm:
    """``gram_form`` for a Gram of size ``side``: the default is ``"pairs"`` on CPU and
    ``"channel_major"`` elsewhere; ``"reduce"`` and ``"pairs"`` only up to ``PAIRS_MAX_SIDE``
    (45 products), larger Grams use ``"channel_major"``."""
    if gram_form is None:
        gram_form = "pairs" if jax.default_backend() == "cpu" else "channel_major"
    if gram_form not in GRAM_FORMS:
        raise ValueError(f"gram_form must be one of {GRAM_FORMS}, got {gram_form!r}")
    return gram_form if side <= PAIRS_MAX_SIDE else "channel_major"


def _conv_grams(
    kernels: Sequence[jax.Array], rescale: bool, gram_form: GramForm | None
) -> tuple[list[jax.Array], list[jax.Array | None]]:
    """Per conv kernel, ``[C_out, d, d]`` Gram matrices on the small side ``d = min(kh*kw,
    C_in)`` and the rescale factors (``None`` without ``rescale``); see the module docstring for
    the two forms."""
    grams, factors = [], []
    for k in kernels:
        kh, kw, cin, cout = k.shape
        form = _resolve_gram_form(gram_form, min(kh * kw, cin))
        if form == "channel_major":
            m, s = _scaled(_channel_matrices(k), (1, 2), rescale)
            grams.append(_gram(m))
        else:
            m = k.reshape(kh * kw, cin, cout)
            if kh * kw > cin:  # the RGB stem: the C_in side is the small one
                m = jnp.swapaxes(m, 0, 1)
            m, s = _scaled(m, (0, 1), rescale)
            grams.append(_reduce_gram(m) if form == "reduce" else _pair_gram(m))
        factors.append(s)
    return grams, factors


def _pair_gram(m: jax.Array) -> jax.Array:
    """``[d, n, C_out]`` -> ``[C_out, d, d]``: entry ``(a, b)`` is ``sum(m[a] * m[b], axis=0)``,
    one reduction per distinct pair (never a broadcast product: see the module docstring)."""
    d = m.shape[0]
    pairs = _upper_pairs(d)
    return _symmetric(d, pairs, [jnp.sum(m[a] * m[b], axis=0) for a, b in pairs])


def _reduce_gram(m: jax.Array) -> jax.Array:
    """As :func:`_pair_gram`, but the ``d (d + 1) / 2`` sums are ONE variadic ``lax.reduce``, so
    XLA can read ``m`` in one loop instead of once per pair."""
    d = m.shape[0]
    pairs = _upper_pairs(d)
    zero = jnp.zeros((), m.dtype)
    sums = jax.lax.reduce(
        tuple(m[a] * m[b] for a, b in pairs),
        (zero,) * len(pairs),
        lambda x, y: tuple(xi + yi for xi, yi in zip(x, y, strict=True)),
        (0,),
    )
    return _symmetric(d, pairs, list(sums))


def _upper_pairs(d: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(d) for b in range(a, d)]


def _symmetric(d: int, pairs: list[tuple[int, int]], entries: list[jax.Array]) -> jax.Array:
    """``[C_out, d, d]`` symmetric matrices from their upper-triangle entries (each ``[C_out]``)."""
    entry = dict(zip(pairs, entries, strict=True))
    rows = [jnp.stack([entry[min(a, b), max(a, b)] for b in range(d)], -1) for a in range(d)]
    return jnp.stack(rows, -2)


def _channel_matrices(kernel: jax.Array) -> jax.Array:
    """``[kh, kw, C_in, C_out]`` -> ``[C_out, kh*kw, C_in]``, channel ``k``'s matrix in row ``k``.

    One 2-D transpose of the ``[kh*kw*C_in, C_out]`` view: XLA:CPU runs it about 3x faster than the
    equivalent 3-D permutation, and the Gram product then contracts the minor axis.
    """
    kh, kw, cin, cout = kernel.shape
    return kernel.reshape(kh * kw * cin, cout).T.reshape(cout, kh * kw, cin)


def channel_spectral_norms(
    kernel: jax.Array,
    *,
    rescale: bool = False,
    method: EnergyMethod = "eigvalsh",
    num_squarings: int = NUM_SQUARINGS,
    gram_form: GramForm | None = None,
) -> jax.Array:
    """sigma_max of every output channel of a conv kernel.

    Args:
      kernel: ``[kh, kw, C_in, C_out]`` (flax layout; the PyTorch matrix ``W[k].reshape(C_in, kh*kw)``
        is the transpose of ``kernel[:, :, :, k].reshape(kh*kw, C_in)``, same singular values).
      rescale: divide each channel by its largest absolute entry before the Gram product (and
        multiply back after), which extends the exact range to any finite kernel; see the module
        docstring for the cost.
      method: ``"eigvalsh"`` (the reference: LAPACK's symmetric eigensolver on each channel's Gram
        matrix) or ``"squaring"`` (repeated squaring of the trace-normalised Gram, plain matrix
        products; see the module docstring).
      num_squarings: ``method="squaring"`` only: squarings per Gram (worst-case relative error
        about ``1.04 / 2**num_squarings``).
      gram_form: how the Gram matrices are formed, ``"reduce"``, ``"pairs"`` or
        ``"channel_major"`` (same values up to float32 rounding; see the module docstring).
        Default: ``"pairs"`` on CPU,
        ``"channel_major"`` on other backends.

    Returns:
      ``[C_out]`` float32, the largest singular value of each channel's ``C_in x kh*kw`` matrix.
    """
    _check_method(method)
    (be,) = _conv_norms([kernel], rescale, method, num_squarings, gram_form)
    return be


def backdoor_energy(
    variables: Variables,
    *,
    layers: LayerSelection = "conv_bn",
    layout: EnergyLayout | None = None,
    bn_epsilon: float = BN_EPSILON,
    rescale: bool = False,
    method: EnergyMethod = "eigvalsh",
    gram_form: GramForm | None = None,
) -> list[jax.Array]:
    """Backdoor energy of every scored layer of one model (mars_spec §1.2).

    ``BE_k = sigma_max(W_k) * |gamma_k / sqrt(running_var_k + eps)|`` for output channel ``k`` of a
    conv whose kernel reshaped per channel is ``W_k`` (``C_in x kh*kw``), followed by a BatchNorm
    with scale ``gamma`` (running_var NaN or negative -> 0, as the official code). A conv without
    BatchNorm is scored unscaled. Pure, jit-able and vmappable over a leading client axis of
    ``variables`` (``layout`` is static; compute it from one model, without the client axis).

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of one model.
      layers: ``"conv_bn"`` or ``"all"`` (ignored when ``layout`` is given).
      layout: the layers to score (:func:`energy_layout`); default: found in ``variables``' own dict
        order (see the module docstring's caveat).
      bn_epsilon: BatchNorm variance epsilon (1e-5 in PyTorch and in our models).
      rescale: see :func:`channel_spectral_norms` (off: kernels with entries beyond about
        ``1e15`` give inf, below about ``1e-15`` lose accuracy).
      method: how each Gram matrix's top eigenvalue is found: ``"eigvalsh"`` (LAPACK, the
        reference) or ``"squaring"`` (plain matrix products; :func:`channel_spectral_norms`).
      gram_form: how the conv Gram matrices are formed (:func:`channel_spectral_norms`).

    Returns:
      One float32 array per layer: ``[C_out]`` for a conv, ``[1]`` for a dense layer.
    """
    _check_method(method)
    if layout is None:
        layout = energy_layout(variables, layers=layers)
    params, stats = _collections(variables)

    conv_kernels, dense_mats = [], []
    for layer in layout:
        kernel = _get(params, layer.path + ("kernel",))
        if kernel is None:
            raise KeyError(f"no kernel at params/{'/'.join(layer.path)}")
        if layer.kind == "conv":
            conv_kernels.append(kernel)
        else:
            m = kernel.astype(jnp.float32)
            if layer.norm is not None:
                gain = _bn_gain(
                    _get(params, layer.norm + ("scale",)),
                    _get(stats, layer.norm + ("var",)),
                    bn_epsilon,
                )
                m = m * gain[None, :]
            dense_mats.append(m)

    # One eigenvalue step over the conv and dense layers together (one eigvalsh per Gram size).
    grams, factors = _conv_grams(conv_kernels, rescale, gram_form)
    for m in dense_mats:
        m, s = _scaled(m[None], (1, 2), rescale)
        grams.append(_gram(m))
        factors.append(s)
    sigmas = _sigmas(_max_eig(grams, method, NUM_SQUARINGS), factors) if grams else []
    conv_sigma, dense_sigma = sigmas[: len(conv_kernels)], sigmas[len(conv_kernels) :]

    out: list[jax.Array] = []
    ci = di = 0
    for layer in layout:
        if layer.kind == "conv":
            be = conv_sigma[ci]
            ci += 1
            if layer.norm is not None:
                be = be * _bn_gain(
                    _get(params, layer.norm + ("scale",)),
                    _get(stats, layer.norm + ("var",)),
                    bn_epsilon,
                )
        else:
            be = dense_sigma[di].reshape((1,))
            di += 1
        out.append(be)
    return out


def cbe_counts(num_channels: Sequence[int], kappa: float = 0.05) -> tuple[int, ...]:
    """How many values per layer CBE keeps, as ``torch.quantile`` + ``>=`` on distinct values.

    ``torch.quantile(v, q)`` (linear interpolation) puts the threshold at rank ``h = q * (n - 1)``,
    computed in the values' dtype (float32); ``v >= thr`` then keeps ``n - floor(h)`` values when
    ``h`` is an integer and ``n - floor(h) - 1`` otherwise. With ``q = 0.95``: 4 of 64, 7 of 128,
    13 of 256, 26 of 512.

    Args:
      num_channels: values per layer.
      kappa: the kept fraction (``q = 1 - kappa``), in ``(0, 1]``.

    Returns:
      The static count per layer (at least 1).
    """
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0, 1], got {kappa!r}")
    q = np.float32(1.0 - kappa)
    counts = []
    for n in num_channels:
        n = int(n)
        if n < 1:
            raise ValueError(f"a layer has {n} values")
        h = np.float32(q * np.float32(n - 1))
        below = math.floor(float(h))
        count = n - below if float(h) == below else n - below - 1
        counts.append(max(1, min(n, count)))
    return tuple(counts)


def cbe_size(layout_or_counts: EnergyLayout | Sequence[int], kappa: float = 0.05) -> int:
    """Length of the CBE vector of a layout (or of per-layer value counts)."""
    if layout_or_counts and isinstance(layout_or_counts[0], EnergyLayer):
        counts = layout_channel_counts(layout_or_counts)  # type: ignore[arg-type]
    else:
        counts = tuple(int(c) for c in layout_or_counts)  # type: ignore[union-attr]
    return sum(cbe_counts(counts, kappa))


def concentrated_backdoor_energy(be: Sequence[jax.Array], kappa: float = 0.05) -> jax.Array:
    """Concentrated backdoor energy: the top values of each layer, channel order kept (§1.3).

    The official code keeps ``v[v >= torch.quantile(v, 1 - kappa)]``. Shapes must be static here, so
    each layer keeps exactly :func:`cbe_counts` values (``lax.top_k``), then the kept indices are
    sorted to restore channel order. With distinct values this equals the official rule. Ties: where
    several channels share the value at the threshold, torch keeps all of them (a longer vector),
    while we keep the fixed count, taking the tied channels with the lowest indices
    (``lax.top_k`` is stable). NaN counts as the largest value.

    Args:
      be: per-layer BE arrays ``[..., C_l]`` (:func:`backdoor_energy`); leading axes are batch axes.
      kappa: kept fraction per layer (0.05 in the paper and the code).

    Returns:
      ``[..., sum_l count_l]`` float32, layers concatenated in order (250 values for ResNet-18).
    """
    counts = cbe_counts([v.shape[-1] for v in be], kappa)
    kept = []
    for v, c in zip(be, counts):
        v = v.astype(jnp.float32)
        if c == v.shape[-1]:
            kept.append(v)
            continue
        _, idx = jax.lax.top_k(v, c)
        idx = jnp.sort(idx, axis=-1)
        kept.append(jnp.take_along_axis(v, idx, axis=-1))
    return jnp.concatenate(kept, axis=-1)
