"""A backbone split in two at a module (the cut): the frozen trunk, images -> the cut's output, and
the tail, the cut's output -> the penultimate features, which `--head tail` fine-tunes.

The model is traced with torch.fx by torchvision's own feature-extraction tracer, with the cut
module kept whole (a leaf), so its output is one node. The tail is every node the output needs after
that one, with the cut's output as its only input; the trunk is every node the cut needs. A model
splits cleanly when nothing after the cut reads the input by another path (a skip connection around
the cut, the image's size): otherwise `split` refuses in one line. timm models are traced the same
way where fx can trace them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from pipeline.errors import ConfigError


@dataclass
class Split:
    """The two halves of one model, sharing its parameters (not copies)."""

    trunk: fx.GraphModule  # images -> the cut's output
    tail: fx.GraphModule  # the cut's output -> features (B, D)
    cut: str


def _tracer(cut: str) -> fx.Tracer:
    from torchvision.models import feature_extraction as fe

    class CutTracer(fe.NodePathTracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return name == cut or super().is_leaf_module(module, name)

    kwargs = fe._set_default_tracer_kwargs(None)  # torchvision's leaf modules and wrapped functions
    return CutTracer(**kwargs)


def _needed(graph: fx.Graph, roots: list[fx.Node], stop: fx.Node | None) -> set[fx.Node]:
    """The nodes `roots` read, transitively, not looking behind `stop`."""
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node is not stop:
            todo.extend(node.all_input_nodes)
    return seen


def _copy(graph: fx.Graph, nodes: list[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])


def split(model: nn.Module, cut: str, name: str = "the model") -> Split:
    """`model` (images -> features) split at module path `cut`; a ConfigError in one line where it
    does not split cleanly."""
    try:
        graph = _tracer(cut).trace(model)
    except Exception as exc:  # fx raises many kinds; the user needs one line, not the trace
        raise ConfigError(
            f"--head tail: {name} cannot be traced by torch.fx ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]}); use --head linear heads on its features, or a "
            "torchvision model"
        ) from None
    found = [n for n in graph.nodes if n.op == "call_module" and n.target == cut]
    if len(found) != 1:
        raise ConfigError(
            f"--head tail: {name} runs module {cut!r} {len(found)} times on the way to its "
            "features, so there is no one place to cut it; cut at another module"
        )
    node = found[0]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    order = {n: i for i, n in enumerate(graph.nodes)}
    tail_nodes = _needed(graph, [output], node)
    before = _needed(graph, [node], None)  # what the trunk computes
    # Nodes the tail needs from before the cut that depend on the images: a path around the cut.
    leaked = {n for n in tail_nodes - {node} if order[n] < order[node] and _depends_on(n, inputs)}
    if leaked:
        users = [u for n in leaked for u in n.users if u in tail_nodes and order[u] > order[node]]
        where = min(users or leaked, key=order.__getitem__)
        raise ConfigError(
            f"--head tail: {name} does not split cleanly at {cut!r}: after it, {where.name!r} "
            "still reads the images by another path (a skip connection around the cut); cut at a "
            "module that ends a stage (`pipeline backbones NAME --cuts`)"
        )
    trunk_graph, env = fx.Graph(), {}
    _copy(trunk_graph, sorted(before, key=order.get), env)
    trunk_graph.output(env[node])
    tail_graph, env = fx.Graph(), {}
    env[node] = tail_graph.placeholder("cut")
    _copy(tail_graph, sorted(tail_nodes - {node}, key=order.get), env)
    trunk = fx.GraphModule(model, trunk_graph, class_name="Trunk")
    tail = fx.GraphModule(model, tail_graph, class_name="Tail")
    return Split(trunk, tail, cut)


def _depends_on(node: fx.Node, inputs: list[fx.Node]) -> bool:
    """Whether `node` reads one of `inputs` (the placeholders), transitively."""
    targets, seen, todo = set(inputs), set(), [node]
    while todo:
        n = todo.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def of_extractor(body: nn.Module, root: nn.Module, cut: str, name: str) -> Split:
    """`split` of a built backbone (`FeatureExtractor.body`, `.root`) at `cut`, a module path of its
    root: a timm body wraps its root as `model` (its pre-logits path)."""
    prefix = "" if body is root else "model."
    return split(body, prefix + cut, name)


def tail_parameters(tail: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in tail.parameters())


def freeze_statistics(tail: nn.Module) -> nn.Module:
    """Train mode for the tail, with every batch norm in eval mode: its running statistics stay the
    pretrained ones (what a user fine-tuning a few blocks on small data expects)."""
    tail.train()
    for module in tail.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return tail


@torch.no_grad()
def check_exact(model: nn.Module, parts: Split, x: torch.Tensor) -> float:
    """max |tail(trunk(x)) - model(x)|: zero up to rounding when the split is exact."""
    return float((parts.tail(parts.trunk(x)) - model(x)).abs().max())
