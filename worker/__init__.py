"""The Celery workers: the task (`tasks.py`), running one step of a job under its lease (`steps.py`) and the stage
bodies that call `restoration.adaptation.stages` (`stages.py`). Never imports `app`."""
