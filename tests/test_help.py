"""--help from the configs' own comments, a did-you-mean that reads the last word, --cfg job checked."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cifar_cam.cli.commands import COMMANDS
from cifar_cam.cli.helptext import (
    HELP_KEYS,
    describe,
    descriptions,
    did_you_mean,
    group_options,
    known_keys,
    parse_descriptions,
    shown_keys,
)
from cifar_cam.cli.main import main
from cifar_cam.config.recipe import choices_of
from cifar_cam.io import config_dir

GROUPS = ("data", "model", "aug", "optimizer", "scheduler", "trainer")


def test_every_key_a_command_uses_is_described_under_every_group_option() -> None:
    docs, options = descriptions(), group_options()
    missing = []
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for command in HELP_KEYS:
            name = COMMANDS[command][0]  # the command's config (`data` reads data_info.yaml)
            for group in GROUPS:
                for option in options[group]:
                    cfg = compose(name, overrides=[f"{group}={option}"], return_hydra_config=True)
                    choices = choices_of(cfg.hydra.runtime.choices)
                    with open_dict(cfg):
                        del cfg["hydra"]
                    keys = shown_keys(command, cfg)
                    assert len(keys) > 8, (command, group, option)
                    missing += [(command, f"{group}={option}", k) for k, _ in keys  # from its own file
                                if not describe(k, name, choices, docs, own_file=True)]
    assert not missing, sorted(set(missing))[:10]


def test_comment_lines_aligned_under_a_key_continue_its_description() -> None:
    text = ("a: 1          # first part\n"
                "              # second part\n"
                "b:\n"
                "  c: x        # nested\n"
                "# a heading, not a continuation\n"
                "d: 2\n")
    assert parse_descriptions(text, "g.") == {"g.a": "first part second part", "g.b": "", "g.b.c": "nested",
                                              "g.d": ""}


def test_help_lists_the_commands_keys_with_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    main(["lr-find", "data=folder", "--help"])
    out = capsys.readouterr().out
    assert "data.image_size=32" in out and "the model's input: a side (32)" in out
    assert "lr_find.num_iter=100" in out and "one optimizer step per iteration" in out
    assert "data            cifar10 cifar100 csv folder* synthetic" in out
    assert "gradcam." not in out and "scheduler.factor" not in out  # lr-find uses neither
    assert "  scheduler " not in out and "progress_every" not in out
    main(["train", "--help"])
    out = capsys.readouterr().out
    assert "trainer.stall_timeout=auto" in out and "seconds without a finished step" in out
    assert "ckpt=null" in out and "resume from a run dir" in out


def test_did_you_mean_reads_the_last_word_and_other_group_options() -> None:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        keys = known_keys(compose("train"))
    hints = did_you_mean("data.size", keys)
    assert "data.image_size (with data=csv, data=folder or data=synthetic)" in hints and "data.val_size" in hints
    assert did_you_mean("optimizer.moment", keys)[0] == "optimizer.momentum"
    assert did_you_mean("trainer.epoch", keys)[0] == "trainer.epochs"
    assert did_you_mean("data.image_size", keys)[0] == "data.image_size (with data=csv, data=folder or data=synthetic)"


def test_did_you_mean_uses_the_group_chosen_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "data=folder", "data.root=/nowhere", "data.imagesize=64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "did you mean data.image_size," in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["-c", "job"], ["--cfg", "job", "--resolve"]])
def test_cfg_job_runs_the_same_check(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "data.size=64", *flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("cifar-cam train: error: unknown config key 'data.size'")
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["train", "optimizer.lr=-1", *flag])
    assert e.value.code == 2 and "optimizer.lr" in capsys.readouterr().err
