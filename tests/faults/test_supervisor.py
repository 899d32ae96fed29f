"""`pdserve up`'s supervision: restart policy (pure) and the supervisor over real short-lived processes."""

import subprocess
import time

import pytest

from services.restarts import CrashHistory, RestartPolicy
from shared.processes import describe_exit
from services.supervisor import Child, Stage, StackError, Supervisor
from shared import processes


def test_backoff_doubles_and_gives_up_after_repeated_crashes():
    history = CrashHistory(RestartPolicy(max_crashes=4, window_s=100, first_backoff_s=1, max_backoff_s=5))
    backoffs = []
    for now in (0, 1, 2):
        history.record(now)
        backoffs.append(history.backoff_s(now))
    assert backoffs == [1, 2, 4]
    assert not history.exhausted(3)
    history.record(3)
    assert history.exhausted(3)
    assert history.backoff_s(3) == 5  # capped


def test_old_crashes_are_forgotten():
    history = CrashHistory(RestartPolicy(max_crashes=2, window_s=10))
    history.record(0)
    history.record(20)
    assert not history.exhausted(20)
    assert history.backoff_s(20) == 1


def test_exits_are_described_by_signal_name():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def shell(script: str) -> subprocess.Popen:
    return processes.spawn(["sh", "-c", script], stderr=subprocess.DEVNULL)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wait_exit(child: Child) -> None:
    child.proc.wait(timeout=10)


def test_a_crashing_worker_is_restarted_then_given_up_on_while_the_rest_serves(tmp_path):
    clock, said = Clock(), []
    supervisor = Supervisor(clock=clock, say=said.append)
    policy = RestartPolicy(max_crashes=3, window_s=60)
    log = tmp_path / "decode-1.log"
    crash = f"echo 'out of memory' >> {log}; exit 3"
    worker = supervisor.add(Child("worker decode-1", Stage.WORKERS, lambda: shell(crash), lambda: log.read_text(), policy=policy))
    gateway = supervisor.add(Child("gateway", Stage.GATEWAY, lambda: shell("sleep 30")))
    for _ in range(3):
        wait_exit(worker)
        supervisor.poll()
        clock.now += 10
        supervisor.poll()  # backoff over: started again (except after the last crash)
    assert said[0] == "worker decode-1 exited with code 3; restarting it in 1s"
    assert said[1].startswith("worker decode-1 restarted (pid ")
    assert "restarting it in 2s" in said[2]
    given_up = said[-1]
    assert "worker decode-1 crashed 3 times within 60s (last: exited with code 3); not restarting it" in given_up
    assert "out of memory" in given_up and "keeps serving" in given_up
    assert worker.retired and worker.proc is None and gateway.running
    supervisor.kill_all()


def test_a_worker_drained_on_purpose_is_not_restarted():
    clock, said = Clock(), []
    supervisor = Supervisor(clock=clock, say=said.append)
    worker = supervisor.add(Child("worker decode-0", Stage.WORKERS, lambda: shell("exit 0")))
    wait_exit(worker)
    supervisor.poll()
    clock.now += 60
    supervisor.poll()
    assert said == ["worker decode-0 exited after a drain; not restarting it"]
    assert worker.retired


def test_an_essential_service_that_keeps_crashing_stops_the_stack():
    clock = Clock()
    supervisor = Supervisor(clock=clock, say=lambda _: None)
    child = supervisor.add(Child("scheduler", Stage.SCHEDULER, lambda: shell("kill -9 $$"), policy=RestartPolicy(max_crashes=2)))
    wait_exit(child)
    supervisor.poll()
    clock.now += 5
    supervisor.poll()
    wait_exit(child)
    with pytest.raises(StackError) as raised:
        supervisor.poll()
    message = str(raised.value)
    assert "scheduler crashed 2 times" in message and "killed by SIGKILL" in message and "cannot serve without the scheduler" in message


def test_stop_goes_gateway_then_workers_then_scheduler_then_nats(tmp_path):
    log = tmp_path / "order"

    def stopping(name: str) -> subprocess.Popen:
        return shell(f"trap 'echo {name} >> {log}; exit 0' TERM; while :; do sleep 0.05; done")

    supervisor = Supervisor(say=lambda _: None)
    for name, stage in (("nats", Stage.NATS), ("scheduler", Stage.SCHEDULER), ("w0", Stage.WORKERS), ("w1", Stage.WORKERS), ("gateway", Stage.GATEWAY)):
        supervisor.add(Child(name, stage, lambda name=name: stopping(name)))
    time.sleep(0.3)  # the traps are set
    supervisor.stop(drain_timeout_s=5, forced=lambda: False)
    order = log.read_text().split()
    assert order[0] == "gateway" and sorted(order[1:3]) == ["w0", "w1"] and order[3:] == ["scheduler", "nats"]


def test_a_second_interrupt_kills_everything_at_once():
    supervisor = Supervisor(say=lambda _: None)
    stubborn = [supervisor.add(Child(f"w{i}", Stage.WORKERS, lambda: shell("trap '' TERM; sleep 30"))) for i in range(2)]
    time.sleep(0.3)
    asked = time.monotonic()
    supervisor.stop(drain_timeout_s=30, forced=lambda: time.monotonic() - asked > 0.5)
    assert time.monotonic() - asked < 5
    assert all(child.proc.returncode == -9 for child in stubborn)
