"""Per-example gradients of the parameters outside the linear layers (``modules:
all_parameters``), for gradient similarity over every parameter of a model.

With ``all_parameters`` the engine tracks every linear layer whose weights no other module
shares as usual (factored, :mod:`estimators.gradients`), and every other parameter here: the
parameters of each module that holds its own (embeddings, norms, a linear layer whose weight
is tied to the embedding, ...). A forward hook keeps each such module's input ``x`` and
output ``y``; from the output gradient ``g`` of the same backward pass as the linear layers',
each example's parameter gradient is

* ``nn.Embedding``: the rows of its tokens, Σₜ e_{idₜ} gₜᵀ ``[V, d]`` (scattered);
* a tied ``nn.Linear``/``Conv1D``: Σₜ gₜ āₜᵀ, as for any linear layer, added to the tied
  parameter's other uses;
* anything else (LayerNorm, RMSNorm, ...): the vector-Jacobian product of the module's own
  forward on that example (``torch.func.vjp`` under ``vmap``), which needs a module that maps
  each example of its first argument on its own.

A parameter used by several modules gets the sum of their contributions (as autograd
gives). Gradients are dense ``{parameter name: [B, numel]}``: the memory model counts them.
A module whose output is shared by the batch (GPT-2's position embedding: ``[1, T, d]``)
has no per-example gradient except with one example per chunk, and says so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap


class ExtraParameters:
    """The parameters of ``model`` outside ``linear`` (the engine's untied linear layers).

    Args:
        model: the model.
        linear: the modules tracked as factored linear layers.
        is_linear: whether a module is a linear layer (nn.Linear or Conv1D).
    """

    def __init__(self, model: nn.Module, linear: set[nn.Module],
                 is_linear: Callable[[nn.Module], bool]):
        names = {id(p): n for n, p in model.named_parameters()}  # first name of each tensor
        self.modules: list[tuple[str, nn.Module]] = [
            (name, m) for name, m in model.named_modules()
            if m not in linear and any(True for _ in m.parameters(recurse=False))]
        self.params: dict[str, Tensor] = {}
        for _, module in self.modules:
            for p in module.parameters(recurse=False):
                self.params.setdefault(names[id(p)], p)
        self.names = names
        self.is_linear = is_linear

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def hooks(self, seen: dict[str, list]) -> list:
        def hook(name: str) -> Callable:
            def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                seen.setdefault(name, []).append((inputs[0].detach(), output))
            return keep

        return [m.register_forward_hook(hook(n)) for n, m in self.modules]

    def per_example(self, seen: dict[str, list], grads: dict[int, Tensor],
                    batch: int) -> dict[str, Tensor]:
        """``{parameter name: [B, numel]}`` from each call's ``(x, y)`` and ``dL/dy``."""
        out = {name: torch.zeros(batch, p.numel(), dtype=p.dtype, device=p.device)
               for name, p in self.params.items()}
        for name, module in self.modules:
            for x, y in seen.get(name, []):
                g = grads.get(id(y))
                if g is None:
                    continue
                if y.shape[0] != batch:
                    raise ValueError(
                        f"modules=all_parameters needs per-example outputs, but {name}'s output "
                        f"has batch size {y.shape[0]} for {batch} examples (it is shared by the "
                        "batch); set estimator.chunk_size=1.")
                for param, value in self._module_grads(module, x, g, batch).items():
                    out[self.names[id(param)]] += value.reshape(batch, -1).to(out[
                        self.names[id(param)]].dtype)
        return out

    def _module_grads(self, module: nn.Module, x: Tensor, g: Tensor,
                      batch: int) -> dict[Tensor, Tensor]:
        if isinstance(module, nn.Embedding):
            weight = module.weight
            rows = torch.zeros(batch, *weight.shape, dtype=g.dtype, device=g.device)
            ids = x.reshape(batch, -1)
            index = torch.arange(batch, device=g.device)[:, None].expand_as(ids)
            rows.index_put_((index.reshape(-1), ids.reshape(-1)),
                            g.reshape(-1, weight.shape[1]), accumulate=True)
            return {weight: rows}
        if self.is_linear(module):
            transposed = not isinstance(module, nn.Linear)
            a = x.reshape(batch, -1, x.shape[-1])
            gg = g.reshape(batch, -1, g.shape[-1])
            w = torch.einsum("bto,bti->boi", gg, a)
            grads = {module.weight: w.transpose(1, 2) if transposed else w}
            if module.bias is not None:
                grads[module.bias] = gg.sum(1)
            return grads
        params = dict(module.named_parameters(recurse=False))

        def one(xb: Tensor, gb: Tensor) -> dict[str, Tensor]:
            _, pull = vjp(lambda p: functional_call(module, p, (xb[None],)), params)
            return pull(gb[None])[0]

        per = vmap(one)(x, g)
        return {params[k]: v for k, v in per.items()}
