"""The service layer shared by the HTTP API (`app/`) and the Celery workers (`worker/`): settings, database rows,
blob storage, job parameters, errors, the task queue (by task name), job and step bookkeeping, the model registry.

It imports `restoration` (the ML core) and never `app`, `worker` or `cli`.
"""
