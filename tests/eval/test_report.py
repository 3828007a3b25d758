"""What report.py says about rows that were not scored (issue 23: a run that scored little said nothing)."""

from eval import report


def _row(uid, **fields):
    return {"uid": uid, "task": "slake_open", **fields}


def test_a_task_is_loud_only_when_more_than_half_its_rows_fail():
    half = [_row("a", error="image 'x.png' not found"), _row("b", output="y")]
    assert report.failure_warnings("slake_open", half) == []
    most = half + [_row("c", error="generation failed (RuntimeError: boom)")]
    [line] = report.failure_warnings("slake_open", most)
    assert line.startswith("slake_open: 2 of 3 rows were not scored; the first, a: image 'x.png' not found")


def test_a_judge_that_mostly_gives_no_verdict_is_loud_with_its_first_reason():
    rows = [_row("a", output="x", judge_status="failed", judge_error="HTTP 401"),
            _row("b", output="x", judge_status="unparseable"), _row("c", output="x", judge_status="ok", judge=1)]
    [line] = report.failure_warnings("slake_open", rows)
    assert line == "slake_open: the judge gave no verdict for 2 of 3 rows; the first, a: HTTP 401"
    assert report.failure_warnings("slake_open", rows[1:]) == []  # one of two is not most


def test_most_rows_of_the_data_unreadable_is_loud():
    problems = [{"uid": "QA.json:0", "reason": "gold 'x' names no option"}, {"uid": "QA.json:1", "reason": "r"}]
    assert report.unread_warnings(4, problems) == []
    [line] = report.unread_warnings(3, problems)
    assert line.startswith("2 of 3 rows of the data could not be read or belong to no task; the first, QA.json:0: gold")
