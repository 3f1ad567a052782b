"""The shared per-example-gradient engine: hooks on linear and convolutional layers.

Every gradient estimator gets its gradients here and nowhere else. A forward hook on each
tracked layer (``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv2d``) keeps the layer's
input ``a`` and its output; one ``torch.autograd.grad`` of the summed per-example values then
gives the output gradient ``g`` for every example at once, without touching ``param.grad``.
A layer's per-example gradient is ``Σ_t g_t ā_tᵀ`` (``ā`` = input with a homogeneous 1 for the
bias, Grosse et al. 2023 §3.1), laid out as ``[d_out, d_in (+1)]``; the tracked layers'
parameters are the θ every estimator attributes through.

A ``Conv2d`` layer is a linear map of its unfolded input patches (Grosse & Martens 2016,
"KFC"; as kronfluence): ``t`` runs over the output positions, ``a_t`` is the patch
``[C_in·kh·kw (+1)]`` seen at position t and ``g_t`` the output gradient ``[C_out]`` there,
so the weight ``[C_out, C_in, kh, kw]`` is laid out as ``[C_out, C_in·kh·kw (+1)]``. Stride,
padding (any ``padding_mode``), dilation and bias are supported; ``groups > 1`` is refused.

Memory: a chunk of ``B`` examples holds ``B × P`` gradient entries; training sets are
streamed chunk by chunk (:meth:`GradientEngine.stream`), never held whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812
from tqdm.auto import tqdm

from estimators.parameters import ExtraParameters
from estimators.problem import AttributionProblem, Batch, eval_mode, move_to

LayerGrads = dict[str, Tensor]  # layer name -> [B, d_out, d_in(+1)]

MODULE_FILTERS = {"all": None, "mlp_only": r"(^|\.)(mlp|fc\d*|ffn|feed_forward)(\.|$)"}


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


@dataclass(frozen=True)
class Layer:
    """A tracked layer and how its ``[d_out, d_in(+1)]`` layout maps to its parameters.

    ``nn.Linear`` ``[d_out, d_in]``; transformers' ``Conv1D`` (``transposed``: its weight is
    ``[d_in, d_out]``); ``nn.Conv2d`` ``[C_out, C_in, kh, kw]`` -> ``[C_out, C_in·kh·kw]``.
    """

    name: str
    module: nn.Module
    transposed: bool  # Conv1D stores its weight as [d_in, d_out]

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def is_conv2d(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def shape(self) -> tuple[int, int]:
        weight = self.module.weight
        d_in, d_out = weight.shape if self.transposed else (weight[0].numel(), weight.shape[0])
        return d_out, d_in + int(self.has_bias)

    def matrix(self) -> Tensor:
        """The layer's parameters as one ``[d_out, d_in(+1)]`` matrix."""
        return self.join(self.module.weight, self.module.bias)

    def join(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Tensors shaped like the layer's weight and bias (its parameters, or e.g. Adam's
        moments of them) as one ``[d_out, d_in(+1)]`` matrix; the inverse of :meth:`split`."""
        w = weight.T if self.transposed else weight.reshape(weight.shape[0], -1)
        return torch.cat([w, bias[:, None]], dim=1) if self.has_bias else w

    def split(self, matrix: Tensor) -> dict[str, Tensor]:
        """Splits a ``[..., d_out, d_in(+1)]`` matrix into ``{weight, bias}`` as the params."""
        w = matrix[..., :-1] if self.has_bias else matrix
        if self.transposed:
            w = w.transpose(-1, -2)
        elif self.is_conv2d:
            w = w.reshape(*w.shape[:-1], *self.module.weight.shape[1:])
        out = {"weight": w}
        if self.has_bias:
            out["bias"] = matrix[..., -1]
        return out

    def inputs(self, x: Tensor, batch: int) -> Tensor:
        """The layer's input as ``[B, T, d_in]``: tokens (or one row) of a linear layer, the
        unfolded patches of a convolution (T = output positions)."""
        if not self.is_conv2d:
            return x.reshape(batch, -1, x.shape[-1])
        conv, padding = self.module, self.module.padding
        if conv.padding_mode != "zeros" or isinstance(padding, str):  # pad as Conv2d does
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding,
                           stride=conv.stride)  # [B, C_in·kh·kw, T]
        return patches.transpose(1, 2)

    def output_grads(self, g: Tensor, batch: int) -> Tensor:
        """The gradient of the layer's output as ``[B, T, d_out]`` (convolution: ``[B, C_out,
        H', W']`` -> positions × channels)."""
        if self.is_conv2d:
            return g.reshape(batch, g.shape[1], -1).transpose(1, 2)
        return g.reshape(batch, -1, g.shape[-1])


def blocks_pattern(model: nn.Module) -> str:
    """A regex of the modules inside the model's stack of transformer blocks: its longest
    ``nn.ModuleList`` (``transformer.h``, ``model.layers``, ``gpt_neox.layers``, ...), so
    that embeddings, the final norm and the lm_head are left out (as Grosse et al. 2023)."""
    stacks = [(len(m), name) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise ValueError(f"modules=blocks needs a model whose transformer blocks are an "
                         f"nn.ModuleList, and {type(model).__name__} has none; use "
                         "modules=all or a regular expression over linear-layer names.")
    prefix = max(stacks)[1]
    return rf"^{re.escape(prefix)}\.\d+\." if prefix else r"^\d+\."


ALL_PARAMETERS = "all_parameters"  # modules: every parameter (estimators.parameters)


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def tracked_layers(model: nn.Module, modules: str | None = None) -> list[Layer]:
    """The linear and convolutional layers of ``model`` whose parameters are attributed
    through (``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d`` with ``groups=1``).

    Args:
        modules: ``None`` or ``"all"`` for every such layer, ``"blocks"`` for those inside
            the transformer blocks (:func:`blocks_pattern`), ``"mlp_only"`` for the MLP
            blocks of a transformer (Grosse et al. 2023 attribute through MLP layers only),
            or a regular expression searched in the module's qualified name.
    """
    if modules == "blocks":
        modules = blocks_pattern(model)
    pattern = MODULE_FILTERS.get(modules or "all", modules)
    conv1d = _conv1d_type()
    layers = []
    for name, module in model.named_modules():
        is_conv1d = conv1d is not None and isinstance(module, conv1d)
        tracked = isinstance(module, nn.Linear | nn.Conv2d) or is_conv1d
        if not tracked or (pattern is not None and not re.search(pattern, name)):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(
                f"Conv2d layer '{name}' has groups={module.groups}, but the gradient engine "
                "tracks convolutions with groups=1 only; leave it out with a `modules` regular "
                "expression that does not match it.")
        layers.append(Layer(name, module, transposed=is_conv1d))
    if not layers:
        raise ValueError(
            f"No linear or convolutional layer of {type(model).__name__} matches modules="
            f"{modules!r}; use 'all', 'blocks', 'mlp_only' or a regular expression that matches "
            "some nn.Linear/Conv1D/Conv2d names."
        )
    return layers


class GradientEngine:
    """Per-example gradients (and K-FAC statistics) of a model's tracked layers.

    Args:
        model: the model; its tracked parameters must require grad.
        modules: the layer filter of :func:`tracked_layers`.
    """

    def __init__(self, model: nn.Module, modules: str | None = None):
        self.model = model
        self.extras: ExtraParameters | None = None
        self.last_extras: dict[str, Tensor] = {}  # capture's per-example extra gradients
        if modules == ALL_PARAMETERS:  # every parameter: untied linear layers + the rest
            uses: dict[int, int] = {}
            for module in model.modules():
                for p in module.parameters(recurse=False):
                    uses[id(p)] = uses.get(id(p), 0) + 1
            self.layers = [layer for layer in tracked_layers(model, "all")
                           if all(uses[id(p)] == 1 for p in layer.module.parameters())]
            self.extras = ExtraParameters(model, {layer.module for layer in self.layers},
                                          _is_linear)
        else:
            self.layers = tracked_layers(model, modules)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def num_params(self) -> int:
        return sum(o * i for o, i in (layer.shape for layer in self.layers))

    @contextmanager
    def _hooks(self) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {layer.name: [] for layer in self.layers}

        def hook(name: str) -> Callable:
            def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                seen[name].append((inputs[0].detach(), output))
            return keep

        handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in self.layers]
        try:
            yield seen
        finally:
            for handle in handles:
                handle.remove()

    def capture(
        self, fn: Callable[[nn.Module, Batch], Tensor], batch: Batch
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Layer inputs and output gradients of the per-example values ``fn(model, batch)``.

        Returns:
            ``{layer: (a, g)}`` with ``a`` ``[B, T, d_in(+1)]`` (homogeneous 1 appended when the
            layer has a bias) and ``g`` ``[B, T, d_out]``; ``T`` is 1 for non-sequence inputs, the
            tokens of a sequence, the output positions of a convolution (``a``: its unfolded
            patches), and counts every call of a layer that is used more than once.
        """
        extra_seen: dict[str, list] = {}
        handles = self.extras.hooks(extra_seen) if self.extras is not None else []
        try:
            with self._hooks() as seen:
                values = fn(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        if values.ndim != 1:
            raise ValueError(f"expected per-example values of shape [B], got {tuple(values.shape)}")
        outputs = [out for layer in self.layers for _, out in seen[layer.name]]
        if not outputs:
            raise RuntimeError("no tracked layer ran in the forward pass; check `modules`.")
        extra_outputs = [y for calls in extra_seen.values() for _, y in calls]
        all_grads = torch.autograd.grad(values.sum(), outputs + extra_outputs,
                                        allow_unused=True)
        if self.extras is not None:
            by_output = {id(y): g for y, g in zip(extra_outputs, all_grads[len(outputs):],
                                                  strict=True) if g is not None}
            self.last_extras = self.extras.per_example(extra_seen, by_output, values.shape[0])
        grads = iter(all_grads[:len(outputs)])
        captured = {}
        for layer in self.layers:
            a_list, g_list = [], []
            for a, out in seen[layer.name]:
                g = next(grads)
                g = torch.zeros_like(out) if g is None else g
                b = values.shape[0]
                a = layer.inputs(a, b)
                if layer.has_bias:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                a_list.append(a)
                g_list.append(layer.output_grads(g.detach(), b))
            captured[layer.name] = ((a_list[0], g_list[0]) if len(a_list) == 1 else
                                    (torch.cat(a_list, dim=1), torch.cat(g_list, dim=1)))
        return captured

    def gradients(self, fn: Callable[[nn.Module, Batch], Tensor], batch: Batch) -> LayerGrads:
        """Per-example gradients ``{layer: [B, d_out, d_in(+1)]}`` of ``fn(model, batch)``."""
        grads = {}
        for name, (a, g) in self.capture(fn, batch).items():
            grad = torch.einsum("bto,bti->boi", g, a)
            if not torch.isfinite(grad).all():
                bad = (~torch.isfinite(grad)).flatten(1).any(1).nonzero().flatten().tolist()
                raise FloatingPointError(
                    f"Non-finite gradient in layer '{name}' for examples {bad[:10]} of the "
                    "batch: check the inputs, lower the training learning rate, or train in "
                    "float64 (the model's loss or measurement overflowed)."
                )
            grads[name] = grad
        return grads

    def stream(
        self,
        problem: AttributionProblem,
        which: str,
        chunk_size: int,
        desc: str | None = None,
    ) -> Iterator[tuple[slice, LayerGrads]]:
        """Streams per-example gradients over the training set or the queries.

        ``which="train"`` differentiates ``problem.loss``, ``which="queries"``
        ``problem.measure``. Yields ``(slice of example indices, {layer: [B, o, i]})``.
        """
        fn = problem.train_loss if which == "train" else problem.query_measure
        start = 0
        loader = problem.loader(which, chunk_size)
        bar = tqdm(loader, desc=desc or f"{which} gradients", leave=False, disable=None)
        with eval_mode(self.model):
            for batch in bar:
                grads = self.gradients(fn, move_to(batch, problem.device))
                size = next(iter(grads.values())).shape[0]
                yield slice(start, start + size), grads
                del grads  # free this chunk before computing the next (peak: one chunk)
                start += size

    def all_gradients(self, problem: AttributionProblem, which: str, chunk_size: int) -> LayerGrads:
        """All per-example gradients of a (small) set, concatenated: ``{layer: [n, o, i]}``."""
        chunks = [g for _, g in self.stream(problem, which, chunk_size)]
        return {name: torch.cat([c[name] for c in chunks]) for name in self.names}

    # Layouts: a dict of per-layer matrices <-> one flat vector per example.
    def flatten(self, grads: LayerGrads) -> Tensor:
        """``{layer: [B, o, i]}`` -> ``[B, P]`` in the engine's layer order."""
        return torch.cat([grads[name].flatten(1) for name in self.names], dim=1)

    def unflatten(self, flat: Tensor) -> LayerGrads:
        """``[B, P]`` -> ``{layer: [B, o, i]}``."""
        out, start = {}, 0
        for layer in self.layers:
            o, i = layer.shape
            out[layer.name] = flat[:, start:start + o * i].reshape(-1, o, i)
            start += o * i
        return out

    def parameters(self) -> Tensor:
        """The tracked parameters θ as one flat vector ``[P]``."""
        return torch.cat([layer.matrix().detach().flatten() for layer in self.layers])

    def as_named_parameters(self, theta: Tensor) -> dict[str, Tensor]:
        """A flat ``[P]`` vector -> ``{qualified parameter name: tensor}`` for functional calls."""
        out = {}
        for layer, matrix in zip(self.layers, self.unflatten(theta[None]).values(), strict=True):
            for kind, value in layer.split(matrix[0]).items():
                out[f"{layer.name}.{kind}" if layer.name else kind] = value
        return out


def score_dtype(model: nn.Module) -> torch.dtype:
    """The dtype scores are computed and returned in: float64 for a float64 model, float32
    otherwise (a bf16/fp16 model's gradients accumulate in float32), whatever torch's
    default dtype."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def dot(queries: LayerGrads, train: LayerGrads, per_layer: bool = False) -> Tensor:
    """Inner products of two sets of layer-wise gradients.

    Returns:
        ``[n_queries, B]``, or ``[n_layers, n_queries, B]`` with ``per_layer`` (summing over
        the first axis gives the total exactly).
    """
    parts = [queries[n].flatten(1) @ train[n].flatten(1).T for n in queries]
    return torch.stack(parts) if per_layer else sum(parts)


def squared_norm(grads: LayerGrads) -> Tensor:
    """``[B]``: the squared norm of each example's gradient over all tracked layers."""
    return sum(g.flatten(1).pow(2).sum(1) for g in grads.values())


def scale(grads: LayerGrads, factor: Tensor) -> LayerGrads:
    """Multiplies each example's gradient by ``factor`` ``[B]``."""
    return {n: g * factor.view(-1, 1, 1).to(g.dtype) for n, g in grads.items()}
