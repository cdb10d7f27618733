"""The pod-lifecycle simulator on the single-node Job's own container command."""

from __future__ import annotations

from prefix.tools import simulate


def test_three_preemptions_of_the_job_command_end_bit_identical(tmp_path):
    report = simulate.play(preemptions=3, seed=0, root=tmp_path, source="job")
    print(report)
    assert report.preemptions == 3, "the run finished before every preemption"
    assert report.reschedules == {"same-node": 1, "new-node": 1, "resubmit": 1}
    assert report.flushed_in_grace == 3, "a SIGTERM flush did not finish inside the grace period"
    # `prefix launch` is PID 1: a flushed stop exits 143, not torchrun's 1, and the Job does not fail on it.
    assert report.exit_codes == [143, 143, 143]
    fail_job = simulate.from_manifest("sim", ["--config", "configs/tiny.yaml"]).fail_job
    assert fail_job and not fail_job & set(report.exit_codes) and report.fail_job == []
    assert report.losses_identical and report.weights_identical and report.ok


def test_the_job_and_the_submit_script_build_the_same_local_command():
    args = ["--config", "configs/tiny.yaml"]
    job, script = simulate.from_manifest("r1", args), simulate.from_submit_script("r1", args)
    assert job.env["PREFIX_RUNS_ROOT"] == script.env["PREFIX_RUNS_ROOT"] == simulate.PVC_PATH
    assert job.grace == script.grace
    for pod in (job, script):
        assert pod.command[:2] == ["bash", "-c"] and pod.command[2].startswith("exec prefix launch ")
        assert "-m prefix.train --run-name r1 --config configs/tiny.yaml" in pod.command[2]
