"""Job robustness on real workers: a SIGKILLed worker's stage is resumed by another one, and cancellation."""
from __future__ import annotations

import copy
import time

import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import TINY_PARAMS, face_files  # noqa: E402


def _start(st, key, name, params, n_faces=8, offset=0):
    r = st.upload_faces(key, face_files(n_faces, offset=offset), name=name)
    assert r.status_code == 201, r.text
    r = st.client.post("/v1/adaptations", json={"dataset_id": r.json()["id"], "name": name, "params": params},
                       headers=st.auth(key))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _kill_holder(st, job_id, stage, min_done=1):
    rows = st.sql("SELECT lease_owner, shard FROM job_steps WHERE job_id = %s AND stage = %s AND status = 'running' "
                  "AND done_count >= %s AND done_count < total_count ORDER BY shard", job_id, stage, min_done)
    if not rows:
        return None
    owner, shard = rows[0]
    pid = int(owner.rsplit(":", 1)[1])
    assert pid in [p.pid for p in st.workers.alive()], (owner, [p.pid for p in st.workers.procs])
    st.workers.kill(pid)
    st.workers.start()  # keep two workers for the other tests; the surviving one may take over first
    return shard


@pytest.mark.parametrize("stage", ["targets", "finetune"])
def test_worker_killed_mid_stage_is_resumed(service_stack, tenant_a, stage):
    """SIGKILL the worker running `stage`; another worker resumes from the last finished image / checkpoint."""
    st = service_stack
    params = copy.deepcopy(TINY_PARAMS)
    if stage == "targets":  # slow shards (one image per batch, more diffusion steps) so the kill lands mid-shard
        params["pseudo"].update(start=30, respacing="50", constrain_until=10, batch_size=1)
    else:
        params["finetune"].update(steps=24, ckpt_every=2)
    # targets: 12 faces, so each of the 2 shards has several images and the kill lands between two of them
    job_id = _start(st, tenant_a, f"killed-{stage}", params, n_faces=8 if stage == "finetune" else 12,
                    offset=30 if stage == "finetune" else 40)
    deadline, shard = time.time() + 240, None
    while shard is None:
        job = st.client.get(f"/v1/adaptations/{job_id}", headers=st.auth(tenant_a)).json()
        assert job["status"] not in ("succeeded", "failed", "cancelled") and time.time() < deadline, job
        # fine-tune: kill after the first checkpoint (step 2 of ckpt_every=2); at step 1 there is nothing to resume from
        shard = _kill_holder(st, job_id, stage, min_done=3 if stage == "finetune" else 1)
        time.sleep(0.3)
    job = st.wait_job(tenant_a, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    # exactly one model; the killed step ran twice, every other step once (nothing else redone)
    assert st.sql("SELECT count(*) FROM models WHERE job_id = %s", job_id)[0][0] == 1
    attempts = {(s, sh): a for s, sh, a in st.sql("SELECT stage, shard, attempts FROM job_steps WHERE job_id = %s", job_id)}
    assert attempts.pop((stage, shard)) == 2, attempts
    assert set(attempts.values()) == {1}, attempts
    (result,) = st.sql("SELECT result FROM job_steps WHERE job_id = %s AND stage = %s AND shard = %s",
                       job_id, stage, shard)[0]
    if stage == "finetune":
        assert result["resumed_from"], result  # went on from the last checkpoint, not from step 0
    else:
        assert result["skipped"] >= 1 and result["generated"] < result["total"], result  # finished images kept
    messages = [e["message"] for e in job["events"]]
    assert any("resumed by" in m for m in messages), messages
    assert any("no heartbeat" in m for m in messages), messages
    models = [m for m in st.client.get("/v1/models", headers=st.auth(tenant_a)).json() if m["name"] == f"killed-{stage}"]
    assert len(models) == 1


def test_cancel_stops_running_job(service_stack, tenant_b):
    st = service_stack
    params = copy.deepcopy(TINY_PARAMS)
    params["finetune"].update(steps=2000, ckpt_every=50)
    job_id = _start(st, tenant_b, "cancel-me", params, offset=60)
    st.wait_job(tenant_b, job_id, pred=lambda j: j["status"] == "finetuning" and j["progress"]["done"] >= 1,
                timeout=240)
    t0 = time.time()
    r = st.client.post(f"/v1/adaptations/{job_id}/cancel", headers=st.auth(tenant_b))
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    job = st.wait_job(tenant_b, job_id, timeout=60)
    assert job["status"] == "cancelled", job
    assert time.time() - t0 < 30
    assert job["progress"]["done"] < 2000
    assert job["model_id"] is None
    assert st.sql("SELECT count(*) FROM models WHERE job_id = %s", job_id)[0][0] == 0
    assert any("cancelled during finetune" in e["message"] for e in job["events"]), job["events"]
    # a finished job cannot be cancelled again
    assert st.client.post(f"/v1/adaptations/{job_id}/cancel", headers=st.auth(tenant_b)).status_code == 409


def test_worker_sigterm_hands_the_stage_over(service_stack, tenant_b):
    """A warm shutdown (SIGTERM, as `docker stop` sends) stops the stage at its next batch and re-queues it at once:
    another worker resumes from the checkpoint without waiting for the lease to expire; it is not a failed attempt."""
    import os
    import signal

    st = service_stack
    params = copy.deepcopy(TINY_PARAMS)
    # long enough that the SIGTERM surely lands in the fine-tune: with 16 steps a starved test process could see
    # step 3 only after the stage had finished, and the hand-over then happened in `evaluate` (resumed_from == 0)
    params["finetune"].update(steps=100, ckpt_every=2)
    job_id = _start(st, tenant_b, "handed-over", params, offset=70)
    # the fine-tune's own progress (100 steps): a new stage starts at 0 of 0, never with the last stage's counts
    def in_finetune(j):
        if j["status"] == "finetuning":  # every poll in the stage shows its own counts (or 0 of 0 before the first)
            assert j["progress"]["total"] in (0, 100), j["progress"]
        return j["status"] == "finetuning" and j["progress"]["total"] == 100 and j["progress"]["done"] >= 3

    st.wait_job(tenant_b, job_id, pred=in_finetune, timeout=240)
    (owner,) = st.sql("SELECT lease_owner FROM job_steps WHERE job_id = %s AND stage = 'finetune'", job_id)[0]
    pid = int(owner.rsplit(":", 1)[1])
    proc = next(p for p in st.workers.alive() if p.pid == pid)
    t0 = time.time()
    os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert time.time() - t0 < 30  # did not wait for the whole stage
    st.workers.start()
    job = st.wait_job(tenant_b, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    attempts = dict(((s, sh), a) for s, sh, a in st.sql("SELECT stage, shard, attempts FROM job_steps WHERE job_id = %s", job_id))
    assert set(attempts.values()) == {1}, attempts  # the hand-over is not counted as a failed attempt
    messages = [e["message"] for e in job["events"]]
    assert any(m.startswith("finetune") and "shutting down; stage paused and re-queued" in m for m in messages), messages
    assert any(m.startswith("finetune") and "resumed by" in m for m in messages), messages
    (result,) = st.sql("SELECT result FROM job_steps WHERE job_id = %s AND stage = 'finetune'", job_id)[0]
    assert result["resumed_from"], result


def test_failing_job_reports_its_error(service_stack, tenant_b):
    """A stage that raises fails the job at once (no retry of a deterministic error), with the reason."""
    st = service_stack
    params = copy.deepcopy(TINY_PARAMS)
    params["size"] = 40  # crops the base restorer cannot take (its input side is a multiple of 64)
    job_id = _start(st, tenant_b, "bad-size", params, n_faces=2, offset=80)
    job = st.wait_job(tenant_b, job_id, timeout=240)
    assert job["status"] == "failed" and job["error"], job
    assert job["model_id"] is None and job["finished_at"]
    assert any(e["kind"] == "error" and e["message"].startswith("failed:") for e in job["events"]), job["events"]
    attempts = [a for (a,) in st.sql("SELECT attempts FROM job_steps WHERE job_id = %s AND attempts > 0", job_id)]
    assert attempts and max(attempts) == 1, attempts


def test_redelivery_is_bounded(service_stack, tenant_b):
    """A step whose workers keep dying is not retried forever: at task_max_attempts the job fails with the reason.
    (Two earlier deaths are recorded in the step's attempt count; the third worker is SIGKILLed for real.)"""
    st = service_stack
    params = copy.deepcopy(TINY_PARAMS)
    params["finetune"].update(steps=200, ckpt_every=5)
    job_id = _start(st, tenant_b, "doomed", params, n_faces=4, offset=150)
    st.wait_job(tenant_b, job_id, pred=lambda j: j["status"] == "finetuning" and j["progress"]["done"] >= 1, timeout=240)
    max_attempts = int(st.env["FACEADAPT_TASK_MAX_ATTEMPTS"])
    st.sql("UPDATE job_steps SET attempts = %s WHERE job_id = %s AND stage = 'finetune' RETURNING attempts",
           max_attempts, job_id)
    (owner,) = st.sql("SELECT lease_owner FROM job_steps WHERE job_id = %s AND stage = 'finetune'", job_id)[0]
    st.workers.kill(int(owner.rsplit(":", 1)[1]))
    st.workers.start()
    job = st.wait_job(tenant_b, job_id, timeout=120)
    assert job["status"] == "failed", job
    assert "task_max_attempts" in job["error"], job["error"]
    assert st.sql("SELECT count(*) FROM models WHERE job_id = %s", job_id)[0][0] == 0
