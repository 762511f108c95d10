"""The in-flight journal a worker leaves for the next worker of its name."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

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


def test_an_unreadable_journal_reads_as_empty(tmp_path: Path) -> None:
    journal = InFlightJournal(tmp_path, "w1")
    journal.path.parent.mkdir(parents=True)
    journal.path.write_text("{not json")
    assert journal.read() == []
    journal.path.write_text('{"a": 1}')  # valid JSON, not a list of ids
    assert journal.read() == []
