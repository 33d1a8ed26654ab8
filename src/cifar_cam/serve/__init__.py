"""`cifar-cam serve`: the HTTP API (FastAPI) over a `Predictor`; see `cifar_cam.serve.app`."""

from cifar_cam.serve.app import Settings, create_app

__all__ = ["Settings", "create_app"]
