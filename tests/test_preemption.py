"""A lost GPU node, end to end: a real Prefect server, the shipped deployments, a build whose fine-tuning, shard
groups and measures are child runs on two process workers, and a worker SIGKILLed with its flow-run process while
its child fine-tunes, then another while its child writes shards, then, at the same time, the one whose child trains
a classifier and the one running a measure started by hand (a top-level run: re-run by the rerun-lost automation).

What a preempted spot node looks like to Prefect: no final state, no goodbye, the run just stops heartbeating.
realfake's lost-run automation (:mod:`tasks.lost_runs`, installed by the fan-out parent itself) marks the child
Crashed, the parent re-submits the lane, group or measure on a surviving worker, the new run resumes (the adapter and
the classifier from their committed checkpoints, shards at shard granularity), and the version verifies with exactly
the planned samples. Each kill is injected at an observed moment (a fine-tune checkpoint, the killed group's first
commit, a classifier checkpoint, seen on storage), never after a sleep. Also here, without a server: the automation's
scope, checked with Prefect's own server-side matcher on the events the shipped deployments' runs emit.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from realfake.data.card import verify_version
from realfake.data.commit import CHECKPOINT_STATE, read_record
from realfake.data.manifest import read_manifest
from realfake.data.shards import committed_shards, iter_shard
from realfake.data.storage import version_store
from tasks.lost_runs import (
    AUTOMATION_NAME,
    CRASHED_MESSAGE,
    HEARTBEAT_SECONDS,
    LOST_AFTER_SECONDS,
    WATCH_TAG,
    lost_run_automation,
)
from tests.support.prefect_server import until

REPO = Path(__file__).resolve().parents[1]
# Kill -> Crashed: the last heartbeat is at most one period before the kill, the automation fires LOST_AFTER_SECONDS
# after it; the server evaluates proactive triggers every 5 s and its actions service then sets the state (ours: 30 s
# covers both on 2 loaded cores).
CRASHED_BOUND_S = HEARTBEAT_SECONDS + LOST_AFTER_SECONDS + 30


# --------------------------------------------------------------------------------------------------------------
# The automation's scope, with Prefect's server-side trigger matcher (no server needed)
# --------------------------------------------------------------------------------------------------------------
def _heartbeat_and_crash_events(tags: list[str]):
    from uuid import uuid4

    from prefect.server.events.schemas.events import ReceivedEvent

    run = f"prefect.flow-run.{uuid4()}"
    related = [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in tags]
    now = dt.datetime.now(dt.UTC)
    return [ReceivedEvent(occurred=now, event=name, resource={"prefect.resource.id": run}, related=related,
                          id=uuid4()) for name in ("prefect.flow-run.heartbeat", "prefect.flow-run.Completed")]


def test_lost_run_automation_watches_the_gpu_deployments_and_never_the_build():
    from prefect.server.events.schemas.automations import Automation as ServerAutomation

    automation = lost_run_automation()
    server_side = ServerAutomation.model_validate({**automation.model_dump(mode="json"),
                                                   "id": "00000000-0000-0000-0000-000000000001"})
    trigger = server_side.trigger
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    watched = {d["name"] for d in deployments if WATCH_TAG in d["tags"]}
    assert {"finetune", "finetune-process", "synthesize-shards", "synthesize-shards-process", "train-eval", "measure",
            "measure-process", "privacy-shadows", "privacy-shadows-process"} <= watched
    assert not {"build", "synthesize", "regenerate", "prepare"} & watched
    for d in deployments:
        heartbeat, completed = _heartbeat_and_crash_events(d["tags"])
        # a run of a watched deployment is tracked from its heartbeats to its final state; any other is ignored
        assert trigger.covers(heartbeat) is (d["name"] in watched), d["name"]
        assert trigger.covers(completed) is (d["name"] in watched), d["name"]
    assert trigger.within.total_seconds() == LOST_AFTER_SECONDS >= 3 * HEARTBEAT_SECONDS
    assert automation.actions[0].state.value == "CRASHED" and not automation.actions[0].force

    # the re-run automation: a crash of a watched run (and nothing else) starts the rerun-lost deployment with it
    from uuid import uuid4

    from prefect.server.events.schemas.events import ReceivedEvent

    from tasks.lost_runs import rerun_automation

    target = uuid4()
    rerun = ServerAutomation.model_validate({**rerun_automation(target).model_dump(mode="json"),
                                             "id": "00000000-0000-0000-0000-000000000002"})
    for d in deployments:
        heartbeat, completed = _heartbeat_and_crash_events(d["tags"])
        crashed = ReceivedEvent.model_validate({**completed.model_dump(), "event": "prefect.flow-run.Crashed",
                                                "id": uuid4()})
        assert rerun.trigger.covers(crashed) is (d["name"] in watched), d["name"]
        assert not rerun.trigger.covers(heartbeat) and not rerun.trigger.covers(completed)
    (action,) = rerun.actions
    assert action.deployment_id == target
    assert action.parameters == {"params": {"flow_run": {"__prefect_kind": "jinja",
                                                         "template": "{{ event.resource.id }}"}}}


# --------------------------------------------------------------------------------------------------------------
# A worker killed while its child run writes shards
# --------------------------------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_node(worker_pid: int) -> list[int]:
    """SIGKILL a worker and every process it started, each whole process group (the flow-run process leads its
    own session): what a preempted node leaves behind is nothing. Returns the killed pids."""
    pids = [worker_pid, *_descendants(worker_pid)]
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _state_history(stack, run_id: str) -> list[str]:
    return [s["type"] for s in stack.api("GET", f"/flow_run_states/?flow_run_id={run_id}")]


def _is_shard_group(child: dict) -> bool:
    return "shard_names" in child["parameters"]["params"]


def _is_measure(child: dict) -> bool:
    return "compare_baseline" in child["parameters"]["params"]


def _is_finetune(child: dict) -> bool:
    return not _is_shard_group(child) and not _is_measure(child)


def _classifier_checkpoint(store, seed: int) -> tuple[str, int] | None:
    """(run, epoch) of a committed checkpoint of a classifier of seed ``seed`` not yet done, if one exists."""
    if not store.exists("runs"):
        return None
    for run in store.listdir("runs"):
        if not run.endswith(f"-s{seed}"):
            continue
        state = read_record(store, "runs", run, "checkpoint", CHECKPOINT_STATE)
        if state and not store.exists("runs", run, "metrics.json"):
            return run, int(state["epoch"])
    return None


def _checkpoint_step(store) -> int:
    """The step of the adapter's committed fine-tune checkpoint (0: none committed yet)."""
    state = read_record(store, "adapters", "all", "checkpoint", CHECKPOINT_STATE)
    return int(state["step"]) if state else 0


FINETUNE_STEPS = 8  # a checkpoint after each step; the kill lands after the first, ~7 steps (seconds) before the end
CLASSIFIER_EPOCHS = 30  # a checkpoint after each epoch; the kill lands after the first


@pytest.mark.slow
@pytest.mark.prefect_server
def test_sigkilled_workers_mid_finetune_mid_group_and_mid_measure_are_re_run_and_the_build_completes_exactly_once(
        tmp_path_factory, request):
    from flows.params import BuildParams, FanoutParams
    from realfake.build import measures_path
    from tests.support.prefect_server import (
        close_shared_stack,
        miniature_params,
        run_deployment_cli,
        shared_stack,
        write_tiny_models,
    )

    stack = shared_stack(tmp_path_factory.mktemp("prefect"))
    request.session.addfinalizer(close_shared_stack)
    models = write_tiny_models(tmp_path_factory.mktemp("models") / "tiny-sd")
    root = tmp_path_factory.mktemp("datasets")
    main = stack.start_worker("realfake-process", "preempt-main", queue="default", limit=2)
    gpus = [stack.start_worker("realfake-process", f"preempt-gpu-{i}", queue="gpu", limit=1) for i in range(2)]
    started = list(gpus)
    gpu_limit = FanoutParams().gpu_limit  # the measure's too (MeasureParams.gpu_limit, same default)
    # an operator sizes the GPU limit for the pool (infra/README): two slots, one per GPU worker, so the measure
    # child and the measure started by hand train at the same time (restored for the next test on this server)
    before = next((c for c in stack.api("POST", "/v2/concurrency_limits/filter", {}) if c["name"] == gpu_limit), None)
    if before is None:
        stack.api("POST", "/v2/concurrency_limits/", {"name": gpu_limit, "limit": 2})
    else:
        stack.api("PATCH", f"/v2/concurrency_limits/{gpu_limit}", {"limit": 2})
    try:
        params = miniature_params(
            root, models, "lost",
            overrides=[*miniature_params(root, models, "x")["overrides"], "shards.max_count=3",
                       f"finetune.max_steps={FINETUNE_STEPS}", "finetune.checkpoint_every=1",
                       f"classifier.epochs={CLASSIFIER_EPOCHS}", "classifier.checkpoint_every_epochs=1"],
            fanout={"mode": "deployment", "groups": 2, "poll_seconds": 1.0,
                    "shard_deployment": "synthesize-shards/synthesize-shards-process",
                    "finetune_deployment": "finetune/finetune-process",
                    "measure_deployment": "measure/measure-process"},
        )
        build_id = run_deployment_cli(stack, "build/build", params)
        params_config = BuildParams(**params).to_config()
        store = version_store(str(root), "mini", "lost")

        # 1. a node lost while its child run fine-tunes the adapter (one lane: finetune.scope all)
        def finetuning_child_with_a_checkpoint():
            for child in stack.child_runs(build_id):
                if child["state"]["type"] == "RUNNING" and _is_finetune(child):
                    step = _checkpoint_step(store)
                    if step:
                        return child, step
            assert stack.flow_run(build_id)["state"]["type"] not in ("FAILED", "CRASHED", "COMPLETED"), \
                stack.run_logs(build_id)[-4000:]
            return None

        ft_child, step_at_kill = until("a fine-tuning child run with a committed checkpoint",
                                        finetuning_child_with_a_checkpoint, 900, every=0.1)
        (ft_victim,) = [w for w in gpus if w.ran(ft_child["id"])]
        ft_killed_at = dt.datetime.now(dt.UTC)
        _kill_node(ft_victim.proc.pid)
        ft_victim.proc.wait(timeout=30)
        assert not store.exists("adapters", "all", "train_log.json"), "the adapter was done before the kill"
        # the pool replaces the reclaimed node (as a spot pool does), while the lost run is being detected
        gpus = [w for w in gpus if w is not ft_victim]
        gpus.append(stack.start_worker("realfake-process", "preempt-gpu-2", queue="gpu", limit=1))
        started.append(gpus[-1])

        def ft_crashed():
            run = stack.flow_run(ft_child["id"])
            return run if run["state"]["type"] != "RUNNING" else None

        ft_lost = until("the killed fine-tune child leaving Running", ft_crashed, CRASHED_BOUND_S + 60, every=0.5)
        assert ft_lost["state"]["type"] == "CRASHED" and ft_lost["state"]["message"] == CRASHED_MESSAGE, \
            ft_lost["state"]
        ft_crashed_after = dt.datetime.fromisoformat(ft_lost["state"]["timestamp"]) - ft_killed_at
        assert ft_crashed_after.total_seconds() <= CRASHED_BOUND_S

        # 2. a node lost while its child run writes shards
        def running_child_with_a_commit():
            for child in stack.child_runs(build_id):
                if child["state"]["type"] != "RUNNING" or not _is_shard_group(child):
                    continue
                names = set(child["parameters"]["params"]["shard_names"])
                done = {c.name for c in committed_shards(store)} & names
                if done:
                    return child, names, done
            assert stack.flow_run(build_id)["state"]["type"] not in ("FAILED", "CRASHED", "COMPLETED"), \
                stack.run_logs(build_id)[-4000:]
            return None

        child, group, done_at_kill = until("a child run with a committed shard", running_child_with_a_commit, 900,
                                            every=0.1)
        (victim,) = [w for w in gpus if w.ran(child["id"])]
        killed_at = dt.datetime.now(dt.UTC)
        _kill_node(victim.proc.pid)
        victim.proc.wait(timeout=30)
        assert len(done_at_kill) < len(group), "the group finished before the kill: nothing was lost"

        def crashed():
            run = stack.flow_run(child["id"])
            return run if run["state"]["type"] != "RUNNING" else None

        lost = until("the killed child leaving Running", crashed, CRASHED_BOUND_S + 60, every=0.5)
        assert lost["state"]["type"] == "CRASHED" and lost["state"]["message"] == CRASHED_MESSAGE, lost["state"]
        crashed_after = dt.datetime.fromisoformat(lost["state"]["timestamp"]) - killed_at
        assert crashed_after.total_seconds() <= CRASHED_BOUND_S

        # the parent says which group it waits on, and for how long (its progress artifact)
        waiting_line = re.compile(r"waiting on synthesize stage, shard group \d: child run [a-z]+-[a-z]+ (waiting for "
                                  r"a worker|starting on a worker|running) for \d+m\d\ds, run 2 of 3 \(1 lost before\)")

        def progress_names_the_lost_group():
            found = stack.api("POST", "/artifacts/filter", {"artifacts": {"key": {"any_": [progress_key]}}})
            return waiting_line.search("\n".join(a.get("description") or "" for a in found))

        progress_key = "mini-lost-synthesis-progress"
        until("the progress artifact naming the re-submitted group's run", progress_names_the_lost_group, 600)

        # lost a second time: the re-submitted run's process dies on the surviving worker (the worker lives on and
        # reports it Crashed); the parent submits the group a third time
        survivor = next(w for w in gpus if w is not victim)

        def second_run_running():
            runs = [c for c in stack.child_runs(build_id)
                    if _is_shard_group(c) and set(c["parameters"]["params"]["shard_names"]) == group]
            second = [c for c in runs if c["id"] != child["id"]]
            return second[0] if second and second[0]["state"]["type"] == "RUNNING" else None

        second = until("the re-submitted run Running", second_run_running, 900, every=0.2)
        assert survivor.ran(second["id"])
        for pid in _descendants(survivor.proc.pid):
            os.kill(pid, signal.SIGKILL)

        # 3. the node lost while its child run measures the version (a classifier checkpoint committed), and at the
        # same time 4. a top-level GPU run (no parent: a measure started by hand, classifier seed 1) losing its node:
        # the re-run automation's rerun-lost run puts it back to Scheduled, a worker runs it again and it resumes
        def measuring_child():
            for c in stack.child_runs(build_id):
                if c["state"]["type"] == "RUNNING" and _is_measure(c):
                    return c
            assert stack.flow_run(build_id)["state"]["type"] not in ("FAILED", "CRASHED", "COMPLETED"), \
                stack.run_logs(build_id)[-4000:]
            return None

        m_child = until("the measure child run Running", measuring_child, 900, every=0.2)
        live = [survivor, stack.start_worker("realfake-process", "preempt-gpu-3", queue="gpu", limit=1)]
        started.append(live[-1])  # the pool replaces the node lost in 2: the run by hand takes the free GPU
        by_hand = {k: v for k, v in params.items() if k != "fanout"}
        by_hand["overrides"] = [*params["overrides"], "classifier.seed=1"]
        solo_id = run_deployment_cli(stack, "measure/measure-process", by_hand)
        kills: dict[str, tuple] = {}  # run id -> (classifier run, epoch at the kill, victim, killed at)

        def kill_each_at_its_first_checkpoint():
            for run_id, seed in ((m_child["id"], 0), (solo_id, 1)):
                if run_id in kills:
                    continue
                run = stack.flow_run(run_id)
                assert run["state"]["type"] not in ("FAILED", "CRASHED", "COMPLETED"), stack.run_logs(run_id)[-4000:]
                if run["state"]["type"] != "RUNNING" or not (found := _classifier_checkpoint(store, seed)):
                    continue
                (victim,) = [w for w in live if w.ran(run_id)]
                kills[run_id] = (*found, victim, dt.datetime.now(dt.UTC))
                _kill_node(victim.proc.pid)
                victim.proc.wait(timeout=30)
                live.remove(victim)
                live.append(stack.start_worker("realfake-process", f"preempt-gpu-{3 + len(kills)}", queue="gpu",
                                               limit=1))
                started.append(live[-1])
            return len(kills) == 2

        until("both measure runs killed at a classifier checkpoint", kill_each_at_its_first_checkpoint, 900,
               every=0.1)
        m_run, epoch_at_kill, m_victim, m_killed_at = kills[m_child["id"]]
        s_run, s_epoch, s_victim, s_killed_at = kills[solo_id]
        assert not store.exists("runs", m_run, "metrics.json"), "the classifier was done before the kill"

        build = stack.wait_flow_run(build_id, timeout=900)
        m_lost = stack.flow_run(m_child["id"])
        assert m_lost["state"]["type"] == "CRASHED" and m_lost["state"]["message"] == CRASHED_MESSAGE, m_lost["state"]
        m_crashed_after = dt.datetime.fromisoformat(m_lost["state"]["timestamp"]) - m_killed_at
        assert m_crashed_after.total_seconds() <= CRASHED_BOUND_S
        completed_after = dt.datetime.fromisoformat(build["end_time"]) - killed_at
        print(f"\nfine-tune: kill at checkpoint step {step_at_kill}/{FINETUNE_STEPS} -> Crashed "
              f"{ft_crashed_after.total_seconds():.0f} s; shards: "
              f"kill -> Crashed {crashed_after.total_seconds():.0f} s; "
              f"{len(done_at_kill)}/{len(group)} shards of the lost group were committed at the kill (the group was "
              f"lost a second time on the way); measure: kill at {m_run} epoch {epoch_at_kill}/{CLASSIFIER_EPOCHS} -> "
              f"Crashed {m_crashed_after.total_seconds():.0f} s, kill -> build Completed "
              f"{(dt.datetime.fromisoformat(build['end_time']) - m_killed_at).total_seconds():.0f} s; shard kill -> "
              f"build Completed {completed_after.total_seconds():.0f} s")

        # the lost fine-tune lane ran twice, the second run on another node resumed from the checkpoint committed
        # before the kill (or a later one), and trained every step once
        every_child = stack.child_runs(build_id)
        ft_runs = [c for c in every_child if _is_finetune(c)]
        assert sorted(c["state"]["type"] for c in ft_runs) == ["COMPLETED", "CRASHED"], ft_runs
        (ft_done,) = [c for c in ft_runs if c["state"]["type"] == "COMPLETED"]
        assert not ft_victim.ran(ft_done["id"])
        train_log = store.read_json("adapters", "all", "train_log.json")
        assert step_at_kill <= train_log["resumed_from"] < FINETUNE_STEPS, (step_at_kill, train_log["resumed_from"])
        assert [h["step"] for h in train_log["history"]] == list(range(1, FINETUNE_STEPS + 1))
        assert not store.exists("adapters", "all", "checkpoint", CHECKPOINT_STATE)

        # the lost group ran three times, the last one completed; the other group ran once
        children = [c for c in every_child if _is_shard_group(c)]
        reruns = [c for c in children if set(c["parameters"]["params"]["shard_names"]) == group]
        assert sorted(c["state"]["type"] for c in reruns) == ["COMPLETED", "CRASHED", "CRASHED"], reruns
        assert len(children) == 4 and sum(c["state"]["type"] == "COMPLETED" for c in children) == 2
        assert all(survivor.ran(c["id"]) for c in children if c["state"]["type"] == "COMPLETED")
        # the lost measure ran twice, the second run on the new node resumed the classifier it was training from its
        # checkpoint, and measured the version; no classifier checkpoint is left once the measures are recorded
        m_runs = [c for c in every_child if _is_measure(c)]
        assert sorted(c["state"]["type"] for c in m_runs) == ["COMPLETED", "CRASHED"], m_runs
        (m_done,) = [c for c in m_runs if c["state"]["type"] == "COMPLETED"]
        assert not m_victim.ran(m_done["id"])
        resumed = store.read_json("runs", m_run, "metrics.json")["metrics"]["resumed_from_epoch"]
        assert epoch_at_kill <= resumed <= CLASSIFIER_EPOCHS, (epoch_at_kill, resumed)
        assert all(not store.exists("runs", r, "checkpoint") for r in store.listdir("runs") if r.endswith("-s0"))
        report = store.read_json("report", "report.json")
        assert report["measures"] == store.read_json(*measures_path(params_config))
        assert set(report["measures"]) == {"real", "realfake"}
        assert {"top1", "label_fidelity", "mmd", "frechet"} <= set(report["measures"]["realfake"])
        # a healthy long run outside the automation's scope (the build, heartbeating at Prefect's default 180 s,
        # longer than the 90 s window) was never crashed
        assert "CRASHED" not in _state_history(stack, build_id)
        print(f"fine-tune kill -> build Completed "
              f"{(dt.datetime.fromisoformat(build['end_time']) - ft_killed_at).total_seconds():.0f} s")

        # the parent installed the automation itself, once; installing it again at deploy time changes nothing
        (installed,) = [a for a in stack.api("POST", "/automations/filter", {}) if a["name"] == AUTOMATION_NAME]
        assert installed["trigger"]["within"] == LOST_AFTER_SECONDS
        older = {k: installed[k] for k in ("name", "description", "enabled", "trigger", "actions")}
        stack.api("PUT", f"/automations/{installed['id']}", {**older, "trigger": {**older["trigger"], "within": 60}})
        out = subprocess.run([sys.executable, "-m", "tasks.lost_runs"], cwd=REPO, env=stack.env(), text=True,
                             capture_output=True, timeout=120, check=True).stdout
        assert installed["id"] in out
        now = [a for a in stack.api("POST", "/automations/filter", {}) if a["name"] == AUTOMATION_NAME]
        assert [(a["id"], a["trigger"]["within"]) for a in now] == [(installed["id"], LOST_AFTER_SECONDS)]

        # exactly once: the version verifies, holds every planned shard, one sample per real training image
        # (images_per_real 1), and no key twice
        assert verify_version(store) == []
        planned = {n for c in children for n in c["parameters"]["params"]["shard_names"]}
        commits = committed_shards(store)
        assert sorted(c.name for c in commits) == sorted(planned)
        keys = [s.key for c in commits for s in iter_shard(store.child("synthetic"), c)]
        assert len(keys) == len(set(keys)) == len(read_manifest(store, "train"))

        def solo_completed():  # Crashed first (the lost run), then Scheduled again by its rerun-lost run, then run
            run = stack.flow_run(solo_id)
            assert run["state"]["type"] not in ("FAILED", "CANCELLED"), stack.run_logs(solo_id)[-4000:]
            return run if run["state"]["type"] == "COMPLETED" else None

        solo = until("the measure run by hand Completed after its node was lost", solo_completed, 900, every=1.0)
        history = _state_history(stack, solo_id)
        lost_at = history.index("CRASHED")
        assert history[lost_at + 1] == "SCHEDULED" and history[-1] == "COMPLETED", history
        assert any(w.ran(solo_id) for w in live)  # run again on a live node
        resumed = store.read_json("runs", s_run, "metrics.json")["metrics"]["resumed_from_epoch"]
        assert s_epoch <= resumed <= CLASSIFIER_EPOCHS, (s_epoch, resumed)
        assert all(not store.exists("runs", r, "checkpoint") for r in store.listdir("runs"))
        # the two measures ran at once on one version: each recorded its own seed's file, and the build's report
        # holds its own (seed 0), not the one written last
        solo_measures = store.read_json(*measures_path(BuildParams(**by_hand).to_config()))
        assert solo_measures["real"]["top1"] >= 0 and solo_measures != report["measures"]
        assert report["measures"] == store.read_json(*measures_path(params_config))
        reruns = [r for r in stack.api("POST", "/flow_runs/filter", {"limit": 200})
                  if r["parameters"].get("params", {}).get("flow_run", "").endswith(solo_id)]
        assert [r["state"]["type"] for r in reruns] == ["COMPLETED"], reruns
        assert "scheduled again on its pool" in stack.run_logs(reruns[0]["id"])
        print(f"measure by hand: kill at {s_run} epoch {s_epoch}/{CLASSIFIER_EPOCHS} -> Completed by itself "
              f"{(dt.datetime.fromisoformat(solo['end_time']) - s_killed_at).total_seconds():.0f} s after the kill")
        # every lost child was left to its parent: each of their rerun-lost runs re-ran nothing
        lost_children = {c["id"] for c in every_child if c["state"]["type"] == "CRASHED"}
        left = [r for r in stack.api("POST", "/flow_runs/filter", {"limit": 200})
                if r["parameters"].get("params", {}).get("flow_run", "").removeprefix("prefect.flow-run.")
                in lost_children]
        assert left and all("is a child run: its parent re-submits it" in stack.run_logs(r["id"]) for r in left)
    finally:
        for w in [main, *started]:
            stack.stop_worker(w)
        if before is None:
            stack.api("DELETE", f"/v2/concurrency_limits/{gpu_limit}")
        else:
            stack.api("PATCH", f"/v2/concurrency_limits/{gpu_limit}", {"limit": before["limit"]})


def test_group_deadline_comes_from_the_plan_and_grows_with_the_waves_of_groups():
    from realfake.plan import generation_rate, load_plan_config
    from tasks.child_runs import (
        GROUP_DEADLINE_SLACK,
        GROUP_START_SECONDS,
        UNMEASURED_GROUP_DEADLINE_SECONDS,
        group_deadline,
    )

    cfg = load_plan_config("imagenette")[0]
    rate = generation_rate(cfg)["per_s"]  # measured (benchmarks/results) for the SD v1.5 presets
    names = [f"shard-{i:06d}" for i in range(4)]
    one, why = group_deadline(cfg, names)
    assert one == pytest.approx(GROUP_START_SECONDS + GROUP_DEADLINE_SLACK * 4 * cfg.shards.max_count / rate)
    assert "benchmarks/results/gpu_synthesis" in why
    three, _ = group_deadline(cfg, names, waves=3)  # queued behind two other rounds of groups on the GPU slots
    assert three - GROUP_START_SECONDS == pytest.approx(3 * (one - GROUP_START_SECONDS))
    demo = load_plan_config("demo")[0]
    assert group_deadline(demo, names) == (UNMEASURED_GROUP_DEADLINE_SECONDS,
                                           f"no measured rate ({generation_rate(demo)['missing']})")


def test_finetune_deadline_comes_from_the_plan_and_says_where_an_unmeasured_bound_comes_from():
    from realfake.finetune import training_schedule
    from realfake.plan import finetune_rate, load_plan_config
    from tasks.child_runs import (
        GROUP_DEADLINE_SLACK,
        GROUP_START_SECONDS,
        UNMEASURED_GROUP_DEADLINE_SECONDS,
        finetune_deadline,
    )

    cfg = load_plan_config("imagenette")[0]
    rate = finetune_rate(cfg)["per_s"]  # measured (benchmarks/results/gpu_finetune.json) at the presets' 512 px
    images = [960, 310, 0]  # a lane of three adapters: their training images (a class with none trains nothing)
    samples = sum(training_schedule(cfg.finetune, n).samples for n in images[:2])
    one, why = finetune_deadline(cfg, images)
    assert one == pytest.approx(GROUP_START_SECONDS + GROUP_DEADLINE_SLACK * samples / rate)
    assert f"{samples} fine-tuning samples" in why and "benchmarks/results/gpu_finetune.json" in why
    two, _ = finetune_deadline(cfg, images, waves=2)  # lanes queued behind another round on the GPU slots
    assert two - GROUP_START_SECONDS == pytest.approx(2 * (one - GROUP_START_SECONDS))
    demo = load_plan_config("demo")[0]
    assert finetune_deadline(demo, images) == (UNMEASURED_GROUP_DEADLINE_SECONDS,
                                               f"no measured rate ({finetune_rate(demo)['missing']})")


def test_a_finetune_lane_child_gets_the_pinned_config_its_scopes_and_local_fan_out(tmp_path):
    from flows.finetune import lane_parameters, select_scopes
    from flows.params import BuildParams, FinetuneParams

    params = BuildParams(preset="demo", dataset="lanes", version="v1", root=str(tmp_path),
                         overrides=["finetune.scope=per_class"],
                         fanout={"mode": "deployment", "groups": 2, "gpu_limit": "pool-x",
                                 "finetune_deployment": "finetune/finetune-process"})
    cfg = params.to_config()
    sent = lane_parameters(params.pinned(cfg), params.fanout, ["1", "3"])
    child = FinetuneParams.model_validate(sent["params"])  # what the child run's flow receives
    assert child.scopes == ["1", "3"] and child.to_config() == cfg
    assert (child.fanout.mode, child.fanout.groups, child.fanout.gpu_limit) == ("local", None, "pool-x")
    assert FinetuneParams().scopes is None and "scopes" not in lane_parameters(
        params.pinned(cfg), params.fanout, ["0"])["params"]["fanout"]
    every = ["0", "1", "2", "3"]
    assert select_scopes(cfg, every, None) == every
    assert select_scopes(cfg, every, ["3", "1"]) == ["1", "3"]  # the config's order
    with pytest.raises(ValueError, match=r"^scopes: '7' is not an adapter scope of lanes/v1 \(finetune.scope="
                                         r"per_class: 0, 1, 2, 3\); name one of them or leave scopes empty for all$"):
        select_scopes(cfg, every, ["1", "7"])


def test_measure_deadline_comes_from_the_planned_classifier_work_at_a_published_rate(tmp_path):
    from realfake.build import baseline_config, prepare
    from realfake.data.manifest import read_manifest
    from realfake.plan import PUBLISHED_CLASSIFIER_RATE, classifier_rate, load_plan_config
    from tasks.child_runs import (
        GROUP_DEADLINE_SLACK,
        GROUP_START_SECONDS,
        UNMEASURED_GROUP_DEADLINE_SECONDS,
        measure_deadline,
    )

    demo = load_plan_config("demo", overrides=[f"root={tmp_path}", "source.max_per_class=3", "caption.enabled=false",
                                               "guidance.enabled=false"])[0]
    prepare(demo)
    real = len(read_manifest(version_store(str(tmp_path), demo.dataset, demo.version), "train"))
    gpu = demo.model_copy(update={"device": "cuda"})
    both = {"realfake": gpu, "baseline": baseline_config(gpu)}
    seconds, why = measure_deadline(both)
    passes = demo.classifier.epochs * real * (1 + 2 * demo.synthesis.images_per_real)  # real, then two versions
    rate = classifier_rate(gpu)
    assert seconds == pytest.approx(GROUP_START_SECONDS + GROUP_DEADLINE_SLACK * passes / rate["per_s"])
    assert f"{passes} image passes" in why and PUBLISHED_CLASSIFIER_RATE["file"] in why
    # the published rate is at 224 px: slower in proportion above it, never faster below it
    assert rate["per_s"] == PUBLISHED_CLASSIFIER_RATE["per_s"] and demo.classifier.image_size < 224
    big = gpu.model_copy(update={"classifier": gpu.classifier.model_copy(update={"image_size": 448})})
    assert classifier_rate(big)["per_s"] == pytest.approx(PUBLISHED_CLASSIFIER_RATE["per_s"] / 4)
    # on CPU no GPU rate applies: the unmeasured bound, saying why
    cpu = demo.model_copy(update={"device": "cpu"})
    assert measure_deadline({"realfake": cpu}) == (
        UNMEASURED_GROUP_DEADLINE_SECONDS, f"no measured rate ({classifier_rate(cpu)['missing']})")


def test_the_measure_child_gets_the_pinned_config_the_baseline_it_measures_and_the_gpu_limit(tmp_path):
    from flows.measure import measure_configs, measure_parameters
    from flows.params import BuildParams, MeasureParams

    params = BuildParams(preset="demo", dataset="meas", version="v1", root=str(tmp_path), compare_baseline=True,
                         baseline_prompt="a_photo_of",
                         fanout={"mode": "deployment", "gpu_limit": "pool-x",
                                 "measure_deployment": "measure/measure-process"})
    cfg = params.to_config()
    configs = measure_configs(cfg, params.compare_baseline, params.baseline_prompt)
    sent = measure_parameters(params.pinned(cfg), configs, params.fanout, params.baseline_prompt)
    child = MeasureParams.model_validate(sent["params"])  # what the child run's flow receives
    assert child.to_config() == cfg and child.gpu_limit == "pool-x"
    assert measure_configs(child.to_config(), child.compare_baseline, child.baseline_prompt) == configs
    assert list(configs) == ["realfake", "baseline"] and configs["baseline"].version == "v1-baseline-a-photo-of"
    alone = measure_parameters(params.pinned(cfg), {"realfake": cfg}, params.fanout, "caption")
    assert MeasureParams.model_validate(alone["params"]).compare_baseline is False
