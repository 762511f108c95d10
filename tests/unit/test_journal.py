"""The in-flight journal a worker leaves for the next worker of its name."""

from __future__ import annotations

import threading
from pathlib import Path
from uuid import uuid4

import pytest

from prefect_gpu_workers.journal import JOURNAL_DIR, InFlightJournal


def test_recorded_runs_are_read_back_by_the_next_worker_of_the_name(tmp_path: Path) -> None:
    runs = [uuid4(), uuid4()]
    InFlightJournal(tmp_path, "w1").record(runs)
    # A new journal object, as a restarted worker makes it: same name, same file.
    assert InFlightJournal(tmp_path, "w1").read() == sorted(str(r) for r in runs)
    assert InFlightJournal(tmp_path, "w2").read() == []  # another worker's runs are not its own
    assert (tmp_path / JOURNAL_DIR / "w1.json").exists()


def test_each_record_replaces_the_last_and_clear_forgets_them(tmp_path: Path) -> None:
    journal = InFlightJournal(tmp_path, "w1")
    first, second = uuid4(), uuid4()
    journal.record([first, second])
    journal.record([second])  # the first run ended
    assert journal.read() == [str(second)]
    journal.record([])
    assert journal.read() == []
    journal.record([first])
    journal.clear()
    assert journal.read() == []
    journal.clear()  # nothing to clear is fine


def test_a_corrupt_journal_is_logged_and_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = InFlightJournal(tmp_path, "w1")
    journal.path.parent.mkdir(parents=True)
    for text in ("{not json", '{"a": 1}'):  # not JSON; JSON but not a list of ids
        journal.path.write_text(text)
        assert journal.read() == []
        assert journal.path.with_suffix(".corrupt").read_text() == text
        assert not journal.path.exists()
    assert caplog.text.count("is not a list of run ids") == 2


def test_a_failed_write_is_logged_and_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / JOURNAL_DIR).write_text("a file where the folder should be")
    assert InFlightJournal(tmp_path, "w1").record([uuid4()]) is False
    assert "could not record the flow runs in flight" in caplog.text


def test_two_workers_of_one_name_never_fail_or_leave_staging_files(tmp_path: Path) -> None:
    """Before: one shared staging name, so one writer's rename found the file gone."""
    runs = [[str(uuid4())] for _ in range(2)]
    errors: list[BaseException] = []

    def write(ids: list[str]) -> None:
        journal = InFlightJournal(tmp_path, "w1")
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
    assert InFlightJournal(tmp_path, "w1").read() in runs  # one whole write, the last
    assert sorted(p.name for p in (tmp_path / JOURNAL_DIR).iterdir()) == ["w1.json", "w1.lock"]
