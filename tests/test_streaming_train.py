"""data.streaming end to end: a streamed run preempted (SIGTERM, exit 42) and restarted writes
bitwise the training records of an uninterrupted streamed run, its data order included."""

import pytest
from test_faults import STEPS, assert_bitwise, starts, train_process, train_records

STREAM = (
    "--config.data.streaming=True",
    "--config.data.pack_window=32",
    "--config.data.stream_buffer=64",
)


@pytest.mark.slow
def test_preempted_streamed_run_resumes_bitwise(small_train, tmp_path):
    reference_dir = tmp_path / "reference"
    uninterrupted = train_process(small_train, reference_dir, *STREAM)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    reference = train_records(reference_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    workdir = tmp_path / "run"
    preempted = train_process(small_train, workdir, *STREAM, "--config.faults.sigterm_at_step=5")
    assert preempted.returncode == 42, preempted.stderr[-3000:]
    finished = train_process(small_train, workdir, *STREAM)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [s["resumed_from"] for s in starts(workdir)] == [0, 5]
    assert sorted(train_records(workdir, run=1)) == list(range(6, STEPS + 1))
    assert_bitwise(train_records(workdir, run=0), reference)
    assert_bitwise(train_records(workdir, run=1), reference)
