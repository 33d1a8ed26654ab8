"""Any timm or torchvision classification model as a `Network`: `model=timm model.name=<timm name>`,
`model=torchvision model.name=<torchvision name>`; never with downloaded weights (`model.pretrained` takes
a file).

Both libraries build their nets for 224-px images: a stride-2 (often 7x7) stem and a max-pool shrink a
32-px image to 1x1 before the last stage. `adapt_stem` (model.small_input, the default under 64 px)
replaces the first convolution by a 3x3 stride-1 one and, while the last map would be under 4x4, the
first max-pool by nothing; the log names what it replaced, and a pretrained file's tensors there are
not loaded.

A timm model splits itself (`forward_features`, `forward_head`). A torchvision model is traced with
torch.fx and cut at the input of its last global pooling (or of its flatten) into `trunk` and `head`
graph modules, which keep the original module names below them (`trunk.layer4.1.conv2`). Either way an
identity module named `features` carries the feature map, so Grad-CAM at `features` is the CAM of the
exported features.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import torch
from torch import Tensor, nn

from cifar_cam.models.base import Network, probe_forward

log = logging.getLogger("cifar_cam.models")

SMALL_BELOW = 64      # model.small_input=auto: adapt the stem when the image's shorter side is under this
MIN_FINAL_MAP = 4     # remove the first max-pool while the last feature map would be smaller than this


def unknown_name(library: str, name: str, names: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else f"; {library} has {len(names)} (see its docs)"
    return ValueError(f"model.name={name!r} is not a {library} classification model{hint}")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _smallest_map(net: nn.Module, image_size: tuple[int, int]) -> int:
    """The smallest spatial side of any 4-d module output in a forward pass at `image_size` (eval mode)."""
    smallest = min(image_size)

    def hook(_: nn.Module, __: Any, out: Any) -> None:
        nonlocal smallest
        if isinstance(out, Tensor) and out.ndim == 4:
            smallest = min(smallest, out.shape[-2], out.shape[-1])

    probe_forward(net, image_size, hook, (m for m in net.modules() if m is not net))
    return smallest


def check_input_size(net: nn.Module, image_size: tuple[int, int], name: str) -> None:
    """One forward pass at `image_size` (eval mode): ValueError in one line when the net does not take it."""
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, *image_size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"model.name={name} does not take {image_size[0]}x{image_size[1]} images "
                         f"({str(e).splitlines()[0][:160]}); pass data.image_size=<its input size>") from None
    finally:
        net.train(was_training)


def adapt_stem(net: nn.Module, image_size: tuple[int, int]) -> list[str]:
    """Makes a 224-px net keep small images' detail (see the module docstring); returns the replaced modules."""
    replaced = []
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model.small_input=true adapts the first convolution, and this model has none; "
                         "pass model.small_input=false")
    name, conv = convs[0]
    if conv.stride != (1, 1) or max(conv.kernel_size) > 3:
        _set_submodule(net, name, nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1,
                                            groups=conv.groups, bias=conv.bias is not None))
        replaced.append(name)
    pools = [n for n, m in net.named_modules() if isinstance(m, nn.MaxPool2d)]
    try:
        if pools and _smallest_map(net, image_size) < MIN_FINAL_MAP:
            _set_submodule(net, pools[0], nn.Identity())
            replaced.append(pools[0])
    except (RuntimeError, AssertionError, ValueError) as e:  # e.g. a ViT's patch grid fixed to 224 px
        raise ValueError(f"model.small_input=true does not fit this model ({str(e).splitlines()[0][:160]}); pass "
                         "model.small_input=false and data.image_size=<its input size>") from None
    return replaced


def check_name(library: str, name: str) -> None:
    """ValueError (one line, with the closest names) when `name` is not a classification model of `library`."""
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise unknown_name("timm", name, timm.list_models())
    else:
        from torchvision import models

        names = models.list_models(module=models)
        if name not in names:
            raise unknown_name("torchvision", name, names)


class TimmNet(Network):
    """A timm model (`net`) with an identity `features` after its forward_features."""

    state_prefixes = ("net.",)

    def __init__(self, name: str, num_classes: int, image_size: tuple[int, int], small_input: bool) -> None:
        super().__init__()
        import timm

        check_name("timm", name)
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes)
        self.stem = tuple(f"net.{n}" for n in (adapt_stem(self.net, image_size) if small_input else []))
        self.features = nn.Identity()
        check_input_size(self, image_size, name)
        info = getattr(self.net, "feature_info", None) or []
        earlier = [f"net.{info[-2]['module']}"] if len(info) >= 2 and info[-2].get("module") else []
        self.cam_layers = (*earlier, "features")
        self.feature_layer = "features"

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(self.net.forward_features(x))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.net.forward_head(features)

    def get_classifier(self) -> nn.Linear:
        return self.net.get_classifier()


def _is_global_pool(node: torch.fx.Node, root: nn.Module) -> bool:
    def one(size: Any) -> bool:
        return size in (1, (1, 1), [1, 1])

    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        return isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) and one(m.output_size)
    if node.op == "call_function":
        if node.target in (nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return one(size)
        if node.target is torch.mean:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return dims is not None and sorted(d % 4 for d in dims) == [2, 3]
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, tuple | list) and sorted(d % 4 for d in dims) == [2, 3]
    return False


def _is_flatten(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target in ("flatten", "view", "reshape"))


def split_at_pool(net: nn.Module) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """`net` traced and cut into (trunk: images -> feature map, head: feature map -> logits) at the input of
    its last global pooling, else of its first flatten; ValueError when there is no such cut."""
    traced = torch.fx.symbolic_trace(net)
    nodes = list(traced.graph.nodes)
    pools = [n for n in nodes if _is_global_pool(n, traced)] or [n for n in nodes if _is_flatten(n)][:1]
    if not pools or not isinstance(pools[-1].args[0], torch.fx.Node):
        raise ValueError("found no global pooling or flatten before its classifier to cut features from")
    feat = pools[-1].args[0]
    trunk, env = torch.fx.Graph(), {}
    for node in nodes:
        env[node] = trunk.node_copy(node, lambda n: env[n])
        if node is feat:
            break
    trunk.output(env[feat])
    head, env = torch.fx.Graph(), {feat: None}
    env[feat] = head.placeholder("features")
    after = False
    for node in nodes:
        if node is feat:
            after = True
        elif after and node.op != "placeholder":
            if all(d in env for d in node.all_input_nodes):
                env[node] = head.node_copy(node, lambda n: env[n])
            elif node.op == "output":
                raise ValueError("its head reads more than the feature map")
    parts = []
    for graph in (trunk, head):
        part = torch.fx.GraphModule(traced, graph)
        part.graph.eliminate_dead_code()
        part.delete_all_unused_submodules()
        part.recompile()
        parts.append(part)
    return parts[0], parts[1]


class TorchvisionNet(Network):
    """A torchvision classification model cut into `trunk` and `head` (see the module docstring)."""

    state_prefixes = ("trunk.", "head.")

    def __init__(self, name: str, num_classes: int, image_size: tuple[int, int], small_input: bool) -> None:
        super().__init__()
        from torchvision import models

        check_name("torchvision", name)
        net = models.get_model(name, weights=None, num_classes=num_classes)
        stem = adapt_stem(net, image_size) if small_input else []
        try:
            self.trunk, self.head = split_at_pool(net)
        except (ValueError, TypeError, torch.fx.proxy.TraceError) as e:
            raise ValueError(f"model=torchvision model.name={name}: cannot split it into features and a head "
                             f"({str(e).splitlines()[0][:160]})") from None
        self.stem = tuple(f"trunk.{n}" for n in stem)
        self.features = nn.Identity()
        check_input_size(self, image_size, name)
        self.cam_layers = ("features",)
        self.feature_layer = "features"

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(self.trunk(x))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def get_classifier(self) -> nn.Linear:
        linears = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("its head has no linear classifier")
        return linears[-1]
