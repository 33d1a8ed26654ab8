"""Progressive resizing (trainer.progressive_resize): which size each epoch trains at, the downscale, the task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cifar_cam.tasks.common as common
import cifar_cam.tasks.train as train_task
import cifar_cam.training.loop as loop
from cifar_cam.config.validate import DEFAULT_IMAGE_SIZE, image_size, validate
from cifar_cam.data.batches import ResizedBatches, downscale, epoch_image_size
from cifar_cam.errors import ConfigError
from conftest import TINY, compose_cfg


def test_schedule_lists_the_first_epochs_then_full_size() -> None:
    schedule = [16, 16, 24]
    assert [epoch_image_size(schedule, e, 32) for e in range(1, 6)] == [16, 16, 24, 32, 32]
    assert [epoch_image_size(None, e, 32) for e in (1, 2)] == [32, 32]
    assert epoch_image_size([], 1, 28) == 28


def test_downscale_averages_blocks_and_keeps_full_size_batches() -> None:
    blocks = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    images = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 8x8: every pixel a 2x2 block
    small = downscale(images, 4)
    assert small.shape == (2, 3, 4, 4)
    torch.testing.assert_close(small, blocks)  # halving = the mean of each 2x2 block
    shrunk = downscale(torch.full((3, 3, 32, 32), 0.25), 24)
    assert shrunk.shape == (3, 3, 24, 24)
    torch.testing.assert_close(shrunk, torch.full((3, 3, 24, 24), 0.25))  # a flat image stays flat
    same = torch.rand(2, 3, 8, 8)
    assert downscale(same, 8) is same


def test_resized_batches_keep_labels_and_length() -> None:
    batches = [(torch.rand(4, 3, 32, 32), torch.arange(4)), (torch.rand(2, 3, 32, 32), torch.arange(2))]
    resized = ResizedBatches(batches, 16)
    assert len(resized) == 2
    out = list(resized)
    assert [x.shape for x, _ in out] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert all(torch.equal(y, y0) for (_, y), (_, y0) in zip(out, batches, strict=True))


def test_train_feeds_each_epoch_at_its_scheduled_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[set[int]] = []
    real = loop.train_one_epoch

    def spy(model, batches, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        sizes: set[int] = set()

        class Watch:
            def __len__(self) -> int:
                return len(batches)

            def __iter__(self):  # noqa: ANN204
                for x, y in batches:
                    sizes.add(x.shape[-1])
                    yield x, y

        result = real(model, Watch(), *args, **kwargs)
        seen.append(sizes)
        return result

    monkeypatch.setattr(loop, "train_one_epoch", spy)
    cfg = compose_cfg("train", [*TINY, "trainer.epochs=3", "trainer.progressive_resize=[16,24]",
                                "aug.backend=torch"], run_dir=tmp_path / "run")
    train_task.train(cfg)
    assert seen == [{16}, {24}, {32}]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_sizes_above_the_images_are_refused_before_any_work() -> None:
    cfg = compose_cfg("train", [*TINY, "data.image_size=16", "trainer.progressive_resize=[24]"])
    with pytest.raises(ConfigError, match=r"progressive_resize=\[24\] has sizes above the 16-pixel images"):
        validate(cfg, "train")


def test_cifar10_configs_without_image_size_are_checked_and_loaded_at_32(monkeypatch: pytest.MonkeyPatch) -> None:
    """data=cifar10 sets no data.image_size: validate and load_data must agree on CIFAR's 32 pixels."""
    cfg = compose_cfg("train", ["data=cifar10", f"trainer.progressive_resize=[{DEFAULT_IMAGE_SIZE + 8}]"])
    assert "image_size" not in cfg.data
    assert image_size(cfg) == DEFAULT_IMAGE_SIZE == 32
    with pytest.raises(ConfigError, match=r"sizes above the 32-pixel images"):
        validate(cfg, "train")
    asked: dict[str, object] = {}

    def fake_build_splits(spec: object) -> object:
        asked["spec"] = spec
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(common, "build_splits", fake_build_splits)
    with pytest.raises(RuntimeError, match="stop before loading"):
        common.load_data(cfg)
    assert asked["spec"].fit.size == (32, 32)
    assert image_size(compose_cfg("train", [*TINY, "data.image_size=24"])) == 24
