from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from api.db.models import Job, JobCheckpoint, JobEvaluation, JobEvent, JobMetric
from api.lifecycle import JOBS
from worker import leases
from worker.recorder import EventRecorder
from worker.tick import SupervisorTick


def _recorder(sf, job_id: str, owner: str, out: Path, max_events: int = 1000) -> SupervisorTick:
    """The recorder as the worker drives it: through the supervisor's tick (no timer here)."""
    recorder = EventRecorder(job_id, out)
    return SupervisorTick(sf, job_id, owner, recorder, lease_s=30, every_s=3600, max_events=max_events)


def _step(step: int, total: int = 20) -> dict:
    return {"type": "step", "step": step, "total_steps": total, "loss": 1.0, "g_head": 0.5, "g_tail": 0.25,
            "w_head": 0.75, "trained_tokens": step * 10, "fkl": float("nan"), "rkl": None}  # fmt: skip


def _steps(sf, job_id):
    with sf() as session:
        return session.scalars(
            select(JobMetric.step).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
        ).all()


def test_batches_steps_and_records_history(sf, make_job, tmp_path: Path):
    job_id = make_job()
    assert leases.claim(sf, job_id, "me", lease_s=30)
    rec = _recorder(sf, job_id, "me", tmp_path, 50)
    rec.add({"type": "started", "total_steps": 120, "resumed_from_step": 0})
    assert rec.flushes == 1  # lifecycle events are written at once
    for step in range(1, 121):
        rec.add(_step(step, 120))
    assert rec.flushes == 1 + 2  # two full batches of 50, not one transaction per step
    assert len(_steps(sf, job_id)) == 100
    (tmp_path / "checkpoints/step-00000120").mkdir(parents=True)
    rec.add({"type": "checkpoint", "step": 120, "path": "checkpoints/step-00000120"})
    rec.add({"type": "eval", "step": 120, "rouge_l": 0.3, "val_kl": float("nan")})
    rec.add({"type": "completed", "step": 120, "final_path": "final"})
    assert _steps(sf, job_id) == list(range(1, 121))
    with sf() as session:
        job = session.get_one(Job, job_id)
        assert (job.current_step, job.total_steps, job.progress, job.trained_tokens) == (120, 120, 1.0, 1200)
        assert job.current_metrics["g_head"] == 0.5 and job.current_metrics["eval_rouge_l"] == 0.3
        row = session.scalar(select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step == 7))
        assert (row.g_head, row.g_tail, row.w_head, row.fkl, row.rkl) == (0.5, 0.25, 0.75, None, None)
        evals = session.scalars(select(JobEvaluation).where(JobEvaluation.job_id == job_id)).all()
        assert [(e.step, e.metrics["rouge_l"], e.metrics["val_kl"]) for e in evals] == [(120, 0.3, None)]
        ckpts = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)).all()
        # "final" does not exist on disk here, so only the real checkpoint directory remains.
        assert [(c.step, c.path) for c in ckpts] == [(120, "checkpoints/step-00000120")]
        types = session.scalars(
            select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
        assert types == ["running", "started", "checkpoint", "eval", "completed"]


def test_resume_from_older_checkpoint_leaves_no_gaps_or_duplicates(sf, make_job, tmp_path: Path):
    job_id = make_job()
    assert leases.claim(sf, job_id, "me", lease_s=30)
    rec = _recorder(sf, job_id, "me", tmp_path, 1000)
    rec.add({"type": "started", "total_steps": 20, "resumed_from_step": 0})
    for step in range(1, 13):
        rec.add(_step(step))
    rec.run()
    # The run died after step 12; the newest checkpoint was at step 10. The resumed run replays
    # steps 9.. (a duplicate 9, 10) - their rows must not be duplicated, 11 and 12 are rewritten.
    rec.add(_step(9))
    rec.add({"type": "started", "total_steps": 20, "resumed_from_step": 10})
    for step in range(11, 21):
        rec.add(_step(step))
    rec.add(_step(15))  # a duplicate in the same batch
    rec.run()
    assert _steps(sf, job_id) == list(range(1, 21))


def test_a_recorder_that_lost_its_lease_writes_nothing(sf, make_job, tmp_path: Path):
    job_id = make_job()
    assert leases.claim(sf, job_id, "me", lease_s=30)
    with sf() as session, session.begin():
        session.get_one(Job, job_id).lease_owner = "someone-else"
    rec = _recorder(sf, job_id, "me", tmp_path, 1000)
    rec.add(_step(1))
    rec.run()
    assert rec.lease_lost and _steps(sf, job_id) == []


def test_resume_backfills_history_the_previous_worker_never_recorded(sf, make_job, tmp_path: Path):
    """The previous worker died holding steps 8..12 in memory; its runner wrote them (and a stop
    checkpoint) to events.jsonl, and the new run resumes from that checkpoint at step 12."""
    import json

    job_id = make_job()
    assert leases.claim(sf, job_id, "me", lease_s=30)
    rec = _recorder(sf, job_id, "me", tmp_path, 1000)
    rec.add({"type": "started", "total_steps": 20, "resumed_from_step": 0})
    for step in range(1, 8):
        rec.add(_step(step))
    rec.run()
    (tmp_path / "checkpoints/step-00000012").mkdir(parents=True)
    lines = [{"type": "started", "total_steps": 20, "resumed_from_step": 0}]
    lines += [_step(step) | {"loss": 2.0} for step in range(1, 13)]
    lines += [{"type": "eval", "step": 10, "rouge_l": 0.1}, _step(13)]  # 13: after the checkpoint
    lines += [{"type": "stopped", "step": 12, "checkpoint": "checkpoints/step-00000012"}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"type": "st')
    rec.add({"type": "started", "total_steps": 20, "resumed_from_step": 12})
    assert _steps(sf, job_id) == list(range(1, 13))
    with sf() as session:
        losses = session.scalars(
            select(JobMetric.loss).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
        ).all()
        assert losses == [1.0] * 7 + [2.0] * 5  # recorded rows kept, missing ones filled in
        assert session.scalars(select(JobEvaluation.step).where(JobEvaluation.job_id == job_id)).all() == [10]
        paths = session.scalars(select(JobCheckpoint.path).where(JobCheckpoint.job_id == job_id)).all()
        assert paths == ["checkpoints/step-00000012"]


def _events(sf, job_id) -> list[JobEvent]:
    with sf() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_a_resumed_run_says_from_which_step_why_and_which_steps_are_trained_again(
    sf, make_job, tmp_path: Path
):
    job_id = make_job()
    assert leases.claim(sf, job_id, "first", lease_s=30)
    first = _recorder(sf, job_id, "first", tmp_path)
    first.add({"type": "started", "total_steps": 20, "resumed_from_step": 0})
    for step in range(1, 9):
        first.add(_step(step))
    first.run()
    why = "back to the queue at step 8: the runner was killed (-9)"
    assert leases.transact(sf, JOBS.release, job_id, "first", message=why, count_attempt=True)
    assert leases.claim(sf, job_id, "second", lease_s=30)
    second = _recorder(sf, job_id, "second", tmp_path)
    second.add({"type": "started", "total_steps": 20, "resumed_from_step": 5})
    (resumed,) = [e for e in _events(sf, job_id) if e.type == "resumed"]
    assert resumed.message == (
        "resumed from step 5: back to the queue at step 8: the runner was killed (-9); "
        "steps 6..8 are trained again (no checkpoint after step 5)"
    )
    assert resumed.data == {"step": 5, "previous_step": 8, "reason": why}
    assert [e.type for e in _events(sf, job_id)].count("resumed") == 1  # not on the first start


def test_steps_carry_their_time_and_the_job_its_pace(sf, make_job, tmp_path: Path):
    job_id = make_job()
    assert leases.claim(sf, job_id, "me", lease_s=30)
    rec = _recorder(sf, job_id, "me", tmp_path)
    rec.add({"type": "started", "total_steps": 20, "resumed_from_step": 0})
    for step in range(1, 6):
        rec.add({**_step(step), "time": 1_800_000_000.0 + 2.0 * step})  # one step every 2 s
    rec.run()
    with sf() as session:
        rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step))
        assert [int(r.created_at.timestamp()) - 1_800_000_000 for r in rows] == [2, 4, 6, 8, 10]
        assert session.get_one(Job, job_id).current_metrics["seconds_per_step"] == 2.0
