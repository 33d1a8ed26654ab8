"""Forward hooks on named layers: the only place Grad-CAM touches the model, and always undone.

`LayerHooks` records the output of each named submodule during a forward pass. It is a context
manager: the hooks go away on `release()` or when the `with` block ends, also on an exception
(which it never swallows), so a model is never left carrying hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cifar_cam.errors import ConfigError


def layer_choices(model: nn.Module) -> list[str]:
    """The top-level submodule names of `model` (what an error message offers as targets)."""
    return [name for name, _ in model.named_children()]


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Name -> submodule via `model.get_submodule` ("layer4", "layer4.1", ...); ConfigError for unknown names."""
    if isinstance(names, str):
        names = [names]
    if len(names) == 0:
        raise ConfigError(f"no target layers given; name one or more of {', '.join(layer_choices(model))}")
    layers: dict[str, nn.Module] = {}
    for name in names:
        try:
            layers[str(name)] = model.get_submodule(str(name))
        except AttributeError:
            declared = tuple(getattr(model, "cam_layers", ()))
            raise ConfigError(
                f"target layer {name!r} is not in the model; "
                + (f"its CAM layers: {', '.join(declared)}; " if declared else "")
                + f"its modules: {', '.join(layer_choices(model))} (or a path inside one, such as "
                f"{declared[-1] if declared else layer_choices(model)[-1]}.0)"
            ) from None
    return layers


def hook_count(model: nn.Module) -> int:
    """Forward hooks currently registered anywhere in `model` (0 after a released LayerHooks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class LayerHooks:
    """Records the output of each named layer during a forward pass; `release()` removes the hooks."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.layers = resolve_layers(model, names)
        self.outputs: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._recorder(name)))
        except BaseException:
            self.release()
            raise

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            self._calls[name] = self._calls.get(name, 0) + 1
            self.outputs[name] = output

        return record

    def clear(self) -> None:
        """Forgets the recorded outputs (before the next forward pass)."""
        self.outputs.clear()
        self._calls.clear()

    def checked_outputs(self) -> dict[str, Tensor]:
        """The recorded (N, C, H, W) outputs in the order the layers were named; ConfigError otherwise."""
        result = {}
        for name in self.layers:
            calls = self._calls.get(name, 0)
            if calls == 0:
                raise ConfigError(f"layer {name!r} did not run in the forward pass; pick a layer the model uses")
            if calls > 1:
                raise ConfigError(f"layer {name!r} runs {calls} times per forward pass (a shared module); "
                                  "pick a block or a convolution, e.g. layer4 or layer4.1.conv2")
            output = self.outputs[name]
            if not isinstance(output, Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ConfigError(f"layer {name!r} outputs {shape}, not a feature map (N, C, H, W); "
                                  "pick a convolutional layer such as layer3 or layer4")
            result[name] = output
        return result

    def release(self) -> None:
        """Removes every hook and drops the recorded outputs; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @property
    def active(self) -> int:
        """How many hooks this object still holds."""
        return len(self._handles)

    def __enter__(self) -> LayerHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # returns None: an exception inside the block propagates
