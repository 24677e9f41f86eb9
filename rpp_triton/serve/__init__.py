"""Inference server for (pruned, block-sparse) BERT-family encoders.

- `config`: the typed options (limits, model loading, HTTP, Ray), checked when built.
- `predictor.Predictor`: loads a model directory, sparsifies it where that is faster, compiles it,
  tokenizes, runs the batched forward (padded to bucket shapes when compiled).
- `batching.DynamicBatcher`: groups concurrent requests into batches for one worker thread.
- `service.Service`: the engine the routes call (state, limits, batching); no HTTP in it.
- `errors`: error kinds and the one table of their HTTP statuses.
- `schemas`, `metrics`, `app`: request and response bodies, Prometheus metrics and middlewares, routes.
- `server.serve`: one machine (uvicorn) or `ray_app`: the same routes as a Ray Serve deployment.

`rpp-triton serve MODEL_DIR` (rpp_triton/commands/serve.py) calls `server.serve`.
"""
