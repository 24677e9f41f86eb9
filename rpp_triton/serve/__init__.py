"""Inference server for (pruned, block-sparse) BERT-family encoders.

- `predictor.Predictor`: loads a model directory, sparsifies it, tokenizes, runs the batched forward.
- `batching.DynamicBatcher`: groups concurrent requests into batches for one worker thread.
- `app.create_app`: the FastAPI application (one machine, uvicorn).
- `ray_app.build_application`: the same predictor and routes as a Ray Serve deployment.

`rpp-triton serve MODEL_DIR` (rpp_triton/commands/serve.py) starts either of them.
"""
