"""The `cifar-cam` command line: argv[1] picks the command, the pre-check refuses bad input before torch loads,
a fresh run dir is reserved, then Hydra runs the command's task (cifar_cam.tasks). May import any package."""

from cifar_cam.cli.main import main

__all__ = ["main"]
