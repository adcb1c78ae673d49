"""service.params: every engine field the API accepts is typed and bounded (no service needed)."""
from __future__ import annotations

import dataclasses
import math

import pytest

from service.errors import ServiceError
from service.params import FINETUNE, PSEUDO, TOP, check_params, engine_params
from restoration.adaptation.config import AdaptConfig
from restoration.training.finetune import FinetuneConfig
from restoration.adaptation.pseudo import PseudoTargetParams
from service.settings import ServiceSettings


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_engine_field_has_bounds():
    assert _fields(AdaptConfig) - {"pseudo", "finetune", "hq_dir"} == set(TOP) - {"hq_set"}
    assert _fields(PseudoTargetParams) == set(PSEUDO)
    assert _fields(FinetuneConfig) == set(FINETUNE)


@pytest.mark.parametrize("params", [
    {"finetune": {"lr": math.nan}}, {"finetune": {"lr": math.inf}}, {"finetune": {"steps": 1e9}},
    {"finetune": {"steps": 10**9}}, {"device": "meta"}, {"hq_dir": "/etc"}, {"hq_set": "x"}, {"seed": True},
    {"pseudo": {"respacing": "ddim99999"}}, {"size": 10**5}, {"nope": 1}, {"finetune": {"nope": 1}},
])
def test_refused(params):
    with pytest.raises(ServiceError) as exc:
        check_params(params, ServiceSettings(_env_file=None))
    assert exc.value.status == 422


def test_hq_set_maps_to_the_configured_folder(tmp_path):
    s = ServiceSettings(_env_file=None, hq_sets={"ffhq": tmp_path})
    p = check_params({"hq_set": "ffhq", "device": "cuda:1", "finetune": {"lr": 1e-4}}, s)
    assert engine_params(p, s)["hq_dir"] == str(tmp_path)
    with pytest.raises(ValueError):
        engine_params({"hq_dir": "/etc"}, s)
