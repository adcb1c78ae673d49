"""The API refuses what the CLI refuses: a job's engine checks (`restoration.adaptation.checks.check_cards`) run on the
registry's cards when the job is created (`service.jobs.check_models`), before anything is queued."""
from __future__ import annotations

import pytest

from restoration.models.zoo import Zoo
from service.db import migrate, session_scope
from service.errors import ServiceError
from service.jobs import check_models
from service.registry import sync_zoo_models
from service.rows import ModelRow
from service.settings import get_settings


@pytest.fixture
def session(tmp_path, monkeypatch):
    for k in ("FACEADAPT_DATABASE_URL", "FACEADAPT_MODELS_DIR", "FACEADAPT_DEFAULT_RESTORER", "FACEADAPT_DEFAULT_PRIOR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    migrate()
    with session_scope() as s:
        sync_zoo_models(s)
        s.commit()
        yield s
    get_settings.cache_clear()


def _row(s, name: str) -> ModelRow:
    return s.query(ModelRow).filter(ModelRow.name == name).one()


def _fixed_size_base(s) -> ModelRow:
    """A registry row whose card is a GFPGAN restorer that takes 512 px faces only."""
    card = Zoo().get(get_settings().default_restorer).to_json() | {"name": "gfpgan-like", "arch": "gfpgan_v1_4",
                                                                    "input_size": 512}
    row = ModelRow(tenant_id=None, name="gfpgan-like", kind="restorer", arch="gfpgan_v1_4", builtin=False,
                   sha256="0" * 64, card=card, files={})
    s.add(row)
    s.flush()
    return row


def test_fixed_size_base_refuses_another_size(session):
    base = _fixed_size_base(session)
    with pytest.raises(ServiceError) as e:
        check_models(session, base, {"size": 256})
    assert e.value.status == 422 and "takes 512x512 faces only, not 256x256" in e.value.detail
    check_models(session, base, {})  # its own size: accepted


def test_a_prior_as_base_is_refused(session):
    prior = _row(session, get_settings().default_prior)
    with pytest.raises(ServiceError) as e:
        check_models(session, prior, {})
    assert e.value.status == 422 and "is a prior, not a restorer" in e.value.detail


def test_default_models_pass(session):
    check_models(session, _row(session, get_settings().default_restorer), {"size": 96})
