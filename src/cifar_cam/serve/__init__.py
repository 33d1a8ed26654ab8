"""`cifar-cam serve`: the HTTP API (FastAPI) and page over a Predictor: app, routes, batching, uploads, gallery, the
model slot (reload), lifecycle, metrics, OpenAPI, server. Imports inference and everything below it."""
