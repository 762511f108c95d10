"""The in-flight journal a worker process leaves for the next worker of its name."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from uuid import uuid4

import pytest

from prefect_gpu_workers.procfs import owner_token
from prefect_gpu_workers.worker.journal import JOURNAL_DIR, InFlightJournal


@pytest.fixture
def dead_owner() -> str:
    """The owner token of a process that has ended: an earlier worker."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    token = owner_token(proc.pid)
    proc.kill()
    proc.wait()
    return token


def test_a_dead_worker_s_runs_are_left_behind_for_the_next_worker_of_its_name(
    tmp_path: Path, dead_owner: str
) -> None:
    runs = [uuid4(), uuid4()]
    InFlightJournal(tmp_path, "w1", owner=dead_owner).record(runs)
    (entry,) = InFlightJournal(tmp_path, "w1").left_behind()
    assert entry.owner == dead_owner
    assert entry.run_ids == tuple(sorted(str(r) for r in runs))
    assert InFlightJournal(tmp_path, "w2").left_behind() == []  # another name's are not its own
    InFlightJournal(tmp_path, "w1").forget(entry)
    assert InFlightJournal(tmp_path, "w1").left_behind() == []


def test_a_live_twin_s_runs_and_one_s_own_are_never_left_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers of one name on one PREFECT_HOME: each keeps a file of its own."""
    twin = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        InFlightJournal(tmp_path, "w1", owner=owner_token(twin.pid)).record([uuid4()])
        me = InFlightJournal(tmp_path, "w1")
        me.record([uuid4()])
        assert me.left_behind() == []
        assert "is alive and holds the runs" in caplog.text
    finally:
        twin.kill()
        twin.wait()


def test_a_new_worker_s_writes_never_overwrite_what_an_earlier_one_left(
    tmp_path: Path, dead_owner: str
) -> None:
    """Before: one file per name, so a start that could not settle (Prefect away) lost
    the earlier runs at its first submission."""
    left = uuid4()
    InFlightJournal(tmp_path, "w1", owner=dead_owner).record([left])
    new = InFlightJournal(tmp_path, "w1")
    new.record([uuid4()])
    new.record([uuid4(), uuid4()])
    assert [entry.run_ids for entry in new.left_behind()] == [(str(left),)]


def test_each_record_replaces_the_last_and_no_run_in_flight_leaves_no_file(
    tmp_path: Path,
) -> None:
    journal = InFlightJournal(tmp_path, "w1")
    first, second = uuid4(), uuid4()
    journal.record([first, second])
    journal.record([second])  # the first run ended
    assert journal.read() == [str(second)]
    assert journal.record([]) is True
    assert journal.read() == []
    assert not journal.path.exists()
    assert journal.record([]) is True  # nothing to remove is fine


def test_a_corrupt_journal_is_logged_and_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, dead_owner: str
) -> None:
    journal = InFlightJournal(tmp_path, "w1", owner=dead_owner)
    journal.folder.mkdir(parents=True)
    for text in ("{not json", '["a"]', '{"owner": 1, "runs": []}'):
        journal.path.write_text(text)
        assert InFlightJournal(tmp_path, "w1").left_behind() == []
        assert journal.path.with_suffix(".corrupt").read_text() == text
        assert not journal.path.exists()
    assert caplog.text.count("is not an owner and a list of run ids") == 3


def test_a_failed_write_is_logged_and_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / JOURNAL_DIR).write_text("a file where the folder should be")
    assert InFlightJournal(tmp_path, "w1").record([uuid4()]) is False
    assert "could not record the flow runs in flight" in caplog.text


def test_concurrent_writes_leave_one_whole_file_and_no_staging_files(tmp_path: Path) -> None:
    """Before: one shared staging name, so one writer's rename found the file gone."""
    runs = [[str(uuid4())] for _ in range(2)]
    errors: list[BaseException] = []
    journal = InFlightJournal(tmp_path, "w1")

    def write(ids: list[str]) -> None:
        try:
            for _ in range(200):
                assert journal.record(ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(ids,)) for ids in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert journal.read() in runs  # one whole write
    assert [p.name for p in journal.folder.iterdir()] == [journal.path.name]


def test_runs_in_flight_stay_in_the_journal_until_their_state_is_set(tmp_path: Path) -> None:
    """A run the drain stopped stays recorded after its process ended, until the
    drain has set its state: a SIGKILL between the two leaves it to the next worker."""
    from types import SimpleNamespace

    from prefect_gpu_workers.worker.journal import RunsInFlight

    journal = InFlightJournal(tmp_path, "w1", owner="me:1")
    runs = RunsInFlight(journal)
    first, second = SimpleNamespace(id=uuid4()), SimpleNamespace(id=uuid4())
    runs.started([first, second])
    assert sorted(journal.read()) == sorted([str(first.id), str(second.id)])
    runs.ended(first.id)  # finished on its own
    assert journal.read() == [str(second.id)]
    runs.keep([second.id])  # the drain stops it ...
    runs.ended(second.id)  # ... its process ends ...
    assert journal.read() == [str(second.id)]  # ... and it is still recorded
    runs.settled(second.id)  # its state is set
    assert journal.read() == []
    assert not journal.path.exists()
