"""Property-based API testing: schemathesis generates requests from the OpenAPI spec of the real API process on the
test stack (PostgreSQL, Redis, uvicorn on 127.0.0.1) with all its checks (no 5xx; every status, content type, header
and body as documented; valid data accepted and invalid data refused; 405 with a full Allow header; auth not
ignored) through its examples, coverage, fuzzing and stateful phases. Bounded: a fixed number of cases per operation
(>= 1,000 in all), a fixed seed, a wall-clock limit."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

pytest_plugins = ["test_service_harness"]

from test_service_harness import PY  # noqa: E402

MIN_CASES = 1000
EXAMPLES_PER_OPERATION = int(os.environ.get("FACEADAPT_TEST_SCHEMATHESIS_EXAMPLES", "120"))
SEED = os.environ.get("FACEADAPT_TEST_SCHEMATHESIS_SEED", "10")
CHECKS = "all"
PHASES = "examples,coverage,fuzzing,stateful"
# What JSON Schema cannot say: that the bytes of an upload are a decodable image with a face. Schema-valid uploads of
# other bytes are refused with the documented 400 (not an image, unreadable zip), 413 (pixels, zip limits), 415 (a
# format outside FACEADAPT_IMAGE_FORMATS) or 422 (no file with a face); everywhere else valid data must be accepted.
CONFIG = """
[[operations]]
include-path-regex = "^/v1/(restore|datasets)$"
include-method = "POST"
# 409 and 429 (schemathesis' defaults for valid data, kept here: this list is applied to POST /v1/adaptations too):
# valid requests that the state refuses, a name already taken or a job already finished, the active-job quota; the
# fuzzer finds real datasets of earlier tests of the session and starts jobs with them
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413", "415", "422",
                                                     "429", "503"]
# an upload that breaks the schema (an empty file among too many) may be refused for the limit it also breaks (413)
checks.negative_data_rejection.expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415",
                                                    "422", "428", "429", "5xx"]
"""


def _count_cases(ndjson: Path) -> tuple[int, dict[str, int]]:
    """Test cases (API calls) recorded in schemathesis' NDJSON event stream, and the status codes answered."""
    n, statuses = 0, {}
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        for ev in event.values():
            if not isinstance(ev, dict):
                continue
            for rec in (ev.get("recorder") or {}).get("interactions", {}).values():
                response = rec.get("response") or {}
                if "status_code" in response:
                    n += 1
                    key = str(response["status_code"])
                    statuses[key] = statuses.get(key, 0) + 1
    return n, statuses


def _cancel_new_jobs(st, key: str, before: set[str]) -> None:
    """The fuzzer finds real dataset ids and starts real adaptations with the default parameters (minutes each on
    these 2 cores): cancel them and wait until they stopped, so that they do not hold the workers of later tests."""
    new = [j for j in st.client.get("/v1/adaptations", headers=st.auth(key)).json() if j["id"] not in before]
    for j in new:
        if j["status"] not in ("succeeded", "failed", "cancelled"):
            r = st.client.post(f"/v1/adaptations/{j['id']}/cancel", headers=st.auth(key))
            assert r.status_code in (200, 202, 409), r.text
    for j in new:
        st.wait_job(key, j["id"], timeout=180)


def test_openapi_fuzzing_no_5xx(service_stack, tenant_b, tmp_path):
    st = service_stack
    auth = f"Authorization: Bearer {tenant_b}"
    spec = st.client.get("/openapi.json", headers=st.auth(tenant_b))
    assert spec.status_code == 200, spec.text
    (tmp_path / "openapi.json").write_text(spec.text)
    report = tmp_path / "report"
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    cmd = [str(Path(PY).parent / "schemathesis"), "--config-file", str(tmp_path / "schemathesis.toml"), "run",
           str(tmp_path / "openapi.json"), "--url", st.url, "-H", auth,
           "--checks", CHECKS, "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", SEED,
           "--phases", PHASES, "--workers", "1", "--request-timeout", "60", "--no-shrink",
           "--suppress-health-check", "all", "--report", "ndjson,junit", "--report-dir", str(report)]
    # one worker thread: under CPython 3.11, hypothesis' lambda descriptions call ast.parse from several threads at
    # once and can fail with "SystemError: AST constructor recursion depth mismatch" (a CI run stopped on it)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    before = {j["id"] for j in st.client.get("/v1/adaptations", headers=st.auth(tenant_b)).json()}
    try:
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    finally:
        _cancel_new_jobs(st, tenant_b, before)
    first = out.stdout.find("_" * 10)  # the first failure's header, then every failure and the summary
    summary = (out.stdout[first:][:20000] if first >= 0 else out.stdout[-6000:]) + out.stderr[-2000:]
    ndjson = next(report.glob("*.ndjson"), None)
    assert ndjson is not None, summary
    n, statuses = _count_cases(ndjson)
    print(f"\nschemathesis: {n} cases, statuses {dict(sorted(statuses.items()))}")
    assert not any(code.startswith("5") for code in statuses), (statuses, summary)
    assert out.returncode == 0, summary
    assert n >= MIN_CASES, (n, summary)
    assert st.client.get("/healthz").status_code == 200


def test_405_allow_names_every_method_of_the_path(service_stack, tenant_b):
    """A method a path does not have is 405 with `Allow` listing all the methods the path has (the router alone named
    only those of the first route that matched the path, e.g. `OPTIONS /v1/adaptations` -> `Allow: POST`)."""
    st = service_stack
    for method, path, allow in [("OPTIONS", "/v1/adaptations", "GET, POST"), ("PUT", "/v1/datasets/x", "DELETE, GET"),
                                ("PATCH", "/v1/models/x", "DELETE, GET"), ("POST", "/metrics", "GET"),
                                ("DELETE", "/v1/adaptations/x/events", "GET"), ("TRACE", "/v1/restore", "POST")]:
        r = st.client.request(method, path, headers=st.auth(tenant_b))
        assert r.status_code == 405 and r.headers.get("allow") == allow, (method, path, r.headers.get("allow"))
        assert r.json()["error"] == "http_error"


def test_openapi_documents_errors_and_content_types(service_stack, tenant_b):
    st = service_stack
    spec = st.client.get("/openapi.json", headers=st.auth(tenant_b)).json()
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            codes = op["responses"]
            if path.startswith("/v1/"):
                assert codes["401"]["content"]["application/json"]["schema"] == error_ref, (method, path)
                assert op["security"], (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            if method == "post":
                assert "413" in codes, (method, path)
    ops = spec["paths"]
    assert set(ops["/v1/restore"]["post"]["responses"]) >= {"200", "400", "401", "404", "413", "415", "422", "503"}
    assert set(ops["/v1/adaptations"]["post"]["responses"]) >= {"202", "403", "404", "409", "422", "429", "503"}
    assert "403" in ops["/v1/models/{model_id}"]["delete"]["responses"]
    assert list(ops["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(ops["/v1/adaptations/{job_id}/stream"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]
    form = spec["components"]["schemas"]["Body_restore_v1_restore_post"]["properties"]
    assert form["fidelity"]["type"] == "number" and "anyOf" not in form["fidelity"]  # a form field is never null
    assert form["image"]["minLength"] == 1  # an empty upload is refused
