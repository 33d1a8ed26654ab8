"""The model zoo (issue 29): every architecture through train, export and gradcam; pretrained starts from local
files only, with keys mapped, heads replaced, frozen layers kept; the fine-tuning knobs; refusals in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from cifar_cam.errors import CheckpointError, ConfigError
from cifar_cam.models import ARCHITECTURES, build_model, head_averages, model_from_config
from conftest import compose_cfg
from imagefiles import shapes_tree

# Tiny synthetic data at 16 px, 4 classes, a near-zero LR: the checkpoint gets test images right and wrong alike.
DATA = ["data=synthetic", "data.train_size=64", "data.val_size=0", "data.test_size=32", "data.num_classes=4",
        "data.image_size=16", "data.batch_size=32", "trainer.epochs=1", "eval.batch_size=32", "optimizer.lr=1e-4"]
ZOO = {
    "resnet34": ["model=resnet34", "model.width=4"],
    "resnet50": ["model=resnet50", "model.width=4"],
    "preact_resnet18": ["model=preact_resnet18", "model.width=4"],
    "wide_resnet": ["model=wide_resnet", "model.depth=10", "model.widen=1"],
    "resnet9": ["model=resnet9", "model.width=4"],
    "airbench": ["model=airbench", "model.widths=[8,16,16]"],
    "timm": ["model=timm", "model.name=resnet10t"],
    "torchvision": ["model=torchvision", "model.name=mobilenet_v3_small"],
}


@pytest.mark.parametrize("name", list(ZOO))
def test_each_zoo_model_trains_exports_to_onnx_and_draws_cams_at_its_layers(name: str, tmp_path: Path) -> None:
    from cifar_cam.tasks.export import export
    from cifar_cam.tasks.gradcam import gradcam
    from cifar_cam.tasks.train import train

    train(compose_cfg("train", [*DATA, *ZOO[name]], run_dir=tmp_path / "run"))
    export(compose_cfg("export", [f"ckpt={tmp_path / 'run'}", "export.formats=[onnx]", "export.check_images=16"],
                       run_dir=tmp_path / "export"))
    report = json.loads((tmp_path / "export" / "export.json").read_text())
    assert report["checks"]["onnx"]["max_abs_diff"] <= 1e-4 and report["checks"]["onnx"]["top1_agreement"] == 1.0
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    gradcam(compose_cfg("gradcam", [f"ckpt={tmp_path / 'run'}", "gradcam.num_images=1"], run_dir=tmp_path / "cam"))
    drawn = json.loads((tmp_path / "cam" / "gradcam.json").read_text())
    assert drawn["target_layers"] == card["cam_layers"] and drawn["explained_images"] == 1
    for layer in drawn["target_layers"]:
        assert (tmp_path / "cam" / "gradcam" / f"000_{layer}.png").stat().st_size > 500


def test_every_own_architecture_declares_a_feature_layer_that_is_its_last_cam_layer() -> None:
    from omegaconf import OmegaConf

    from cifar_cam.io import config_dir

    for yaml in sorted((Path(config_dir()) / "model").glob("*.yaml")):
        cfg = OmegaConf.load(yaml)
        if cfg.get("source") is not None:
            continue
        model = model_from_config({**OmegaConf.to_container(cfg), "width": 4} if "width" in cfg else
                                  OmegaConf.to_container(cfg), 3, (32, 32)).eval()
        assert model.cam_layers[-1] == model.feature_layer, yaml.name
        seen = {}
        hook = model.get_submodule(model.feature_layer).register_forward_hook(lambda m, i, o, s=seen: s.update(o=o))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            logits = model(x)
        hook.remove()
        assert torch.equal(seen["o"], model.forward_features(x)) and logits.shape == (2, 3), yaml.name
    assert set(ARCHITECTURES) == {"resnet18", "resnet34", "resnet50", "preact_resnet18", "wide_resnet", "resnet9",
                                  "airbench"}


def test_the_torch_free_check_knows_each_builders_options() -> None:
    from cifar_cam.config.choices import MODEL_META_KEYS, MODEL_NAMES, MODEL_OPTIONS
    from cifar_cam.models.zoo import ARCHITECTURES, LIBRARIES, META_KEYS, takes

    assert MODEL_META_KEYS == META_KEYS and set(MODEL_NAMES) == set(ARCHITECTURES)
    assert {n: set(takes(n)) for n in ARCHITECTURES} == {n: set(MODEL_OPTIONS[n]) for n in ARCHITECTURES}
    assert all(set(takes("x", lib)) == set(MODEL_OPTIONS[lib]) for lib in LIBRARIES)


def test_the_published_parameter_counts() -> None:
    counts = [(name, kw, sum(p.numel() for p in build_model(name, 10, **kw).parameters())) for name, kw in [
        ("resnet18", {}), ("resnet34", {}), ("resnet50", {}), ("resnet9", {}), ("airbench", {}),
        ("wide_resnet", {"depth": 16, "widen": 8}), ("wide_resnet", {"depth": 28, "widen": 10})]]
    assert [n for _, _, n in counts] == [11_173_962, 21_282_122, 23_520_842, 6_573_120, 1_972_792, 10_961_370,
                                         36_479_194]


def test_airbench_whitening_decorrelates_the_patches_it_was_fit_on() -> None:
    model = build_model("airbench", 10)
    images = torch.randn(64, 3, 16, 16) @ torch.eye(16) + torch.randn(64, 3, 1, 1)  # channel-correlated noise
    images[:, 1] = 0.5 * images[:, 0] + 0.5 * images[:, 1]
    model.init_from_data(images)
    with torch.no_grad():
        out = model.whiten(images) - model.whiten.bias.view(1, -1, 1, 1)
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # the 12 eigen-directions (the other 12: negatives)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.diag(torch.diagonal(covariance)), atol=0.05)
    assert torch.allclose(torch.diagonal(covariance), torch.ones(12), atol=0.1)


def test_external_stems_are_adapted_below_64_px_and_heads_that_average_are_known(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cifar_cam.models"):
        small = build_model("resnet18", 3, source="torchvision", image_size=(32, 32), small_input="auto")
    assert small.stem == ("trunk.conv1", "trunk.maxpool") and "stem adapted to 32x32" in caplog.text
    assert small.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 4  # not 1x1
    large = build_model("resnet18", 3, source="torchvision", image_size=(64, 64), small_input="auto")
    assert large.stem == () and large.forward_features(torch.zeros(1, 3, 64, 64)).shape[-1] == 2
    assert head_averages(small, torch.randn(2, 512, 4, 4))
    timm_net = build_model("resnet10t", 3, source="timm", image_size=(32, 32))
    assert timm_net.cam_layers == ("net.layer3", "features") and head_averages(
        timm_net, timm_net.forward_features(torch.zeros(2, 3, 32, 32)))


# -- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["model=vgg"], "unknown choice model=vgg; choose one of: airbench, preact_resnet18, resnet18"),
    (["model=airbench", "model.width=16"], "unknown config key 'model.width'"),
    (["model=resnet18", "model.depth=16"], "unknown config key 'model.depth'"),
    (["model=timm", "model.name=resnet1"], "model.name='resnet1' is not a timm classification model; closest: "),
    (["model=torchvision", "model.name=resnet"], "is not a torchvision classification model; closest: resnet"),
    (["model.pretrained=true"], "model.pretrained=true would download weights, which cifar-cam never does"),
    (["model.freeze=everything"], "model.freeze must be none, backbone, or a list of module names"),
    (["model=wide_resnet", "model.depth=12"], "model.depth must be 6n + 4 for wide_resnet"),
    (["+model.dropout=0.1"], "model=resnet18 does not take model.dropout; nothing would read it (it takes "
                             "model.width)"),
    (["model=timm", "+model.width=8"], "model=timm does not take model.width"),
])
def test_model_mistakes_are_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_cam.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["train", "data=synthetic", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_cam_layer_the_model_lacks_lists_its_layers(tmp_path: Path) -> None:
    from cifar_cam.explain.hooks import resolve_layers

    with pytest.raises(ConfigError, match=r"its CAM layers: block2, block3; its modules: whiten, act, block1"):
        resolve_layers(build_model("airbench", 10), ["layer4"])


# -- pretrained, freeze, backbone_lr_scale -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision resnet18 state dict (ImageNet's 1000 classes, seeded random weights) as a user downloads one."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = resnet18(weights=None, num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_tree(tmp_path_factory.mktemp("shapes") / "tree", per_class=12, sizes=(24, 40))


def test_a_torchvision_state_dict_fills_all_but_the_classifier_and_the_replaced_stem(
        torchvision_file: tuple[Path, dict[str, torch.Tensor]], shapes: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from cifar_cam.tasks.train import train

    path, state = torchvision_file
    data = ["data=folder", f"data.root={shapes}", "data.batch_size=16", "trainer.epochs=1", "optimizer.lr=0.01"]
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        train(compose_cfg("train", [*data, "model=torchvision", "model.name=resnet18", f"model.pretrained={path}",
                                    "model.freeze=backbone"], run_dir=tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "pretrained.json").read_text())
    assert sorted(report["replaced"]) == ["head.fc.bias", "head.fc.weight", "trunk.conv1.weight"]
    assert report["skipped"] == ["conv1.weight", "fc.bias", "fc.weight"] and report["kind"] == "state dict"
    assert len(report["loaded"]) == len(state) - 3
    assert set(report["new"]) == {"head.fc.bias", "head.fc.weight", "trunk.conv1.weight"}
    assert f"model.pretrained: {len(state) - 3} tensors loaded" in caplog.text
    assert "model.freeze: everything but the classifier and the adapted stem (trunk.conv1, trunk.maxpool) frozen" \
        in caplog.text
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    trained = last["model"]
    frozen = [k for k in state if k not in ("conv1.weight", "fc.weight", "fc.bias")]
    assert all(torch.equal(trained[f"trunk.{k}"], state[k]) for k in frozen)  # weights and BatchNorm statistics
    # what trains: the new classifier (weight, bias) and the new stem, not left at its random start
    assert sum(len(g["params"]) for g in last["optimizer"]["param_groups"]) == 3


def test_a_cifar_cam_run_fine_tunes_on_another_class_count(shapes: Path, tmp_path: Path) -> None:
    from cifar_cam.tasks.train import train

    source = ["data=synthetic", "data.train_size=64", "data.val_size=0", "data.test_size=16", "data.batch_size=32",
              "model.width=8", "trainer.epochs=1"]
    train(compose_cfg("train", source, run_dir=tmp_path / "cifar"))
    train(compose_cfg("train", ["data=folder", f"data.root={shapes}", "data.batch_size=16", "model.width=8",
                                "trainer.epochs=1", f"model.pretrained={tmp_path / 'cifar'}"], run_dir=tmp_path / "ft"))
    report = json.loads((tmp_path / "ft" / "pretrained.json").read_text())
    assert report["kind"] == "cifar-cam checkpoint" and report["replaced"] == ["fc.bias", "fc.weight"]
    assert report["new"] == ["fc.bias", "fc.weight"] and report["skipped"] == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "cannot be read"),
    (lambda p: torch.save(build_model("resnet9", 10, width=8).state_dict(), p), "a file of another architecture?"),
    (lambda p: torch.save(build_model("resnet18", 10, width=16).state_dict(), p),
     "does not fit this model: bn1.weight is [16] in the file, [8] here"),
    (lambda p: torch.save({"step": 3}, p), "holds no state dict"),
])
def test_weights_that_do_not_fit_are_refused_before_training(make: object, message: str, tmp_path: Path) -> None:
    from cifar_cam.training.weights import load_pretrained

    path = tmp_path / "weights.pth"
    make(path)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match="model.pretrained=") as e:
        load_pretrained(build_model("resnet18", 3, width=8), str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_refused_pretrained_file_is_one_line_exit_2_and_writes_nothing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_cam.cli.main import main

    torch.save(build_model("resnet9", 10, width=8).state_dict(), tmp_path / "other.pth")
    with pytest.raises(SystemExit) as e:
        main(["train", "data=synthetic", "data.train_size=64", "data.val_size=0", "data.test_size=16", "model.width=8",
              f"model.pretrained={tmp_path / 'other.pth'}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "a file of another architecture?" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_backbone_lr_scale_and_freeze_resume_exactly(tmp_path: Path) -> None:
    from cifar_cam.tasks.train import train

    knobs = ["data=synthetic", "data.train_size=96", "data.val_size=0", "data.test_size=16", "data.batch_size=32",
             "model.width=8", "model.freeze=[conv1,bn1,layer1]", "optimizer.backbone_lr_scale=0.1",
             "trainer.num_threads=1"]
    train(compose_cfg("train", [*knobs, "trainer.epochs=2"], run_dir=tmp_path / "straight"))
    train(compose_cfg("train", [*knobs, "trainer.epochs=1"], run_dir=tmp_path / "split"))
    train(compose_cfg("train", [*knobs, "trainer.epochs=2", f"ckpt={tmp_path / 'split'}"], run_dir=tmp_path / "split"))
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    groups = a["optimizer"]["param_groups"]
    assert sorted(g["lr_factor"] for g in groups) == [0.1, 1.0]  # the classifier at lr, the rest at lr x 0.1
    fresh = build_model("resnet18", 10, width=8)
    assert not torch.equal(a["model"]["layer2.0.conv1.weight"], fresh.layer2[0].conv1.weight)


def test_the_classifier_steps_at_lr_and_the_backbone_at_its_scale() -> None:
    from omegaconf import OmegaConf

    from cifar_cam.training.optim import build_optimizer

    model = build_model("resnet18", 3, width=4)
    spec = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.0,
                             "backbone_lr_scale": 0.25, "bias_lr_scale": 1.0})
    optimizer = build_optimizer(spec, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.allclose(before["fc.weight"] - model.fc.weight, torch.full_like(model.fc.weight, 0.1))
    assert torch.allclose(before["conv1.weight"] - model.conv1.weight, torch.full_like(model.conv1.weight, 0.025))
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)  # the factor applies around the step only


def test_biases_step_at_their_scale_with_the_same_decay_per_step() -> None:
    from omegaconf import OmegaConf

    from cifar_cam.training.optim import build_optimizer

    model = build_model("airbench", 3)
    spec = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.0,
                             "weight_decay": 0.01, "backbone_lr_scale": 1.0, "bias_lr_scale": 64.0})
    optimizer = build_optimizer(spec, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    model.block1.norm1.bias.grad = torch.ones_like(model.block1.norm1.bias)
    model.whiten.bias.grad = torch.ones_like(model.whiten.bias)
    optimizer.step()
    # a convolution's bias (the whitening layer's) is not a BatchNorm shift: lr, as airbench94's other_params
    whiten = before["whiten.bias"]
    assert torch.allclose(model.whiten.bias, whiten - 0.1 * 1 - 0.1 * 0.01 * whiten)
    # a BatchNorm shift: lr x 64 on the gradient, the decay (lr x weight_decay) per step unchanged
    shift = before["block1.norm1.bias"]
    assert torch.allclose(model.block1.norm1.bias, shift - 6.4 * 1 - 0.1 * 0.01 * shift)
    conv = before["block1.conv1.weight"]
    assert torch.allclose(model.block1.conv1.weight, conv - 0.1 * 0.01 * conv)  # a filter: lr, decay alone
    assert torch.equal(model.block1.norm1.weight, before["block1.norm1.weight"])  # airbench's fixed scale


def test_finetune_preset_needs_the_weights(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_cam.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["train", "experiment=finetune", "data=synthetic", "--cfg", "job"])
    assert e.value.code == 2 and "model.pretrained is required" in capsys.readouterr().err
