"""`python -m cifar_cam ...` is `cifar-cam ...` (and what torchrun launches)."""

from cifar_cam.cli.main import main

if __name__ == "__main__":
    main()
