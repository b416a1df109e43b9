"""Pure selection: union, dedupe, matchedBy, the custom-property pair re-check, allow-list."""

from hypothesis import given
from hypothesis import strategies as st

from butler_mqtt.config import AllowList
from butler_mqtt.model import QrsTask, StartRequest
from butler_mqtt.replies import summary
from butler_mqtt.selection import allowed, plan, select

A = "aaaaaaaa-0000-0000-0000-000000000001"
B = "aaaaaaaa-0000-0000-0000-000000000002"
C = "aaaaaaaa-0000-0000-0000-000000000003"
MISSING = "aaaaaaaa-0000-0000-0000-0000000000ff"

TASKS = [
    QrsTask(A, "Task A", tags=("daily", "finance"), custom_properties=(("taskGroup", "x"), ("priority", "y"))),
    QrsTask(B, "Task B", tags=("Daily",), custom_properties=(("taskGroup", "y"),)),
    QrsTask(C, "Task C", enabled=False),
]


def test_union_each_task_once_with_every_reason():
    req = StartRequest(taskId=[A], tag=["daily", "finance"])
    sel = select(req, TASKS + TASKS)  # QRS chunks may repeat a task
    assert sel.task_ids == [A, B]
    assert sel.selected[0].matched_by == [f"taskId:{A}", "tag:daily", "tag:finance"]
    assert sel.selected[1].matched_by == ["tag:daily"]  # case-insensitive, like QRS
    assert sel.not_found == []


def test_custom_property_pair_is_rechecked():
    # QRS matches name and value clause by clause: task A has taskGroup=x and priority=y, so
    # QRS returns it for taskGroup=y. It must not be selected.
    req = StartRequest(customProperty=[{"name": "taskGroup", "value": "y"}])
    sel = select(req, TASKS)
    assert sel.task_ids == [B]


def test_not_found_names_each_criterion():
    req = StartRequest(taskId=[MISSING], tag=["nope"], customProperty=[{"name": "n", "value": "v"}])
    sel = select(req, TASKS)
    assert sel.selected == []
    assert sel.not_found == [{"taskId": MISSING}, {"tag": "nope"}, {"customProperty": {"name": "n", "value": "v"}}]


def test_all_task_ids_must_exist_blocks_only_id_selected_tasks():
    req = StartRequest(taskId=[A, MISSING, C], tag=["finance"], allTaskIdsMustExist=True)
    # A is also selected by tag: still starts. C only by ID: denied.
    outcomes = {o.task_id: o for o in plan(select(req, TASKS), req, None)}
    assert outcomes[A].status == "started"
    assert outcomes[C].status == "denied"
    assert MISSING in (outcomes[C].reason or "")


def test_all_task_ids_must_exist_when_all_exist_starts_all():
    req = StartRequest(taskId=[A, C], allTaskIdsMustExist=True)
    assert [o.status for o in plan(select(req, TASKS), req, None)] == ["started", "started"]


def test_allow_list_judged_on_the_task_itself():
    allow = AllowList(tags=["FINANCE"], task_ids=[C])
    assert allowed(TASKS[0], allow)  # by its tag, whatever selected it
    assert not allowed(TASKS[1], allow)
    assert allowed(TASKS[2], allow)  # by its ID
    allow_cp = AllowList(custom_properties=[{"name": "taskGroup", "value": "y"}])
    assert allowed(TASKS[1], allow_cp)
    assert not allowed(TASKS[0], allow_cp)  # has taskGroup=x and priority=y: not the pair


def test_plan_denies_outside_allow_list_and_dry_run_starts_nothing():
    req = StartRequest(tag=["daily"], dryRun=True)
    outcomes = plan(select(req, TASKS), req, AllowList(task_ids=[A]))
    assert [(o.task_id, o.status) for o in outcomes] == [(A, "wouldStart"), (B, "denied")]


def test_summary_shape():
    req = StartRequest(tag=["daily", "nope"])
    outcomes = plan(select(req, TASKS), req, AllowList(task_ids=[A]))
    outcomes[0].status, outcomes[0].execution_id = "started", "e"
    s = summary("r1", outcomes, [{"tag": "nope"}])
    assert s["event"] == "summary" and s["requestId"] == "r1"
    assert s["tasksStarted"] == [{"taskId": A, "taskName": "Task A", "status": "started"}]
    assert s["tasksDenied"][0]["taskId"] == B
    assert s["tasksNotFound"] == [{"tag": "nope"}]
    assert s["totalTasksStarted"] == 1
    assert s["tasksFailed"] == []


names = st.text(min_size=1, max_size=20).filter(lambda s: not any(ord(c) < 32 or ord(c) == 127 for c in s))


@given(st.lists(st.lists(names, max_size=4), min_size=1, max_size=8), names)
def test_a_tag_selects_exactly_the_tasks_carrying_it(tag_sets, wanted):
    tasks = [QrsTask(f"aaaaaaaa-0000-0000-0000-{i:012d}", f"t{i}", tags=tuple(ts)) for i, ts in enumerate(tag_sets)]
    sel = select(StartRequest(tag=[wanted]), tasks)
    expected = [t.id for t in tasks if any(x.casefold() == wanted.casefold() for x in t.tags)]
    assert sel.task_ids == expected
