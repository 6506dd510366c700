"""The screening station (serve.py): an HTTP API around one Predictor with dynamic batching, a live page and an
audit log. app.py: routes and serve.py's task; station.py: model, batcher, audit and folder; batching.py,
audit.py, uploads.py, auth.py, page.py: one concern each. See docs/serving.md."""
