"""The HTTP API (FastAPI): routes, schemas, API-key auth, the upload limit middleware, the serving micro-batcher
and model cache, Prometheus metrics. Everything else is the service layer (`service/`); never imports `worker`."""
