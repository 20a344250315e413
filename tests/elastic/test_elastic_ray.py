"""End to end on a real local Ray cluster with the real built-in engine (builtin:tiny, CPU, gloo).

Two CPU slots. Under a steady load of concurrent streaming and non-streaming requests the deployment switches
replicas 2->1, TP 1->2->1, replicas 1->2; then an engine process of the new generation is killed during a
switch. Every response must be complete and equal to the greedy reference taken from the first configuration;
no request may fail. Invalid reconfigurations are rejected with 4xx and change nothing. Switch time by phase
is printed (run with -s to see it).
"""
import os
import signal
import threading
import time

import pytest
import requests
from elastic_load import LoadGenerator, reference_outputs

from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment
from foundry_sglang.elastic.layout import LayoutError

ray = pytest.importorskip("ray")

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = DeploymentConfig(model="builtin:tiny", slots=2, tp=1, replicas=2, backend="ray", port=0,
                           api_token=TOKEN, log_dir=str(tmp_path_factory.mktemp("elastic-logs")),
                           extra_args=["--num-kv-pages", "512", "--max-running-requests", "16"],
                           env={"OMP_NUM_THREADS": "1"}, start_timeout=180, queue_timeout=240)
    dep = ElasticDeployment(cfg)
    try:
        dep.start()
        yield dep
    finally:
        dep.stop()
        ray.shutdown()


def _print_job(job):
    phases = " ".join(f"{k}={v:.2f}s" for k, v in job["phases_s"].items())
    print(f"\n  {job['from']} -> {job['to']}: {job['state']} ({job['strategy']}), "
          f"total {job['total_s']:.2f}s: {phases}")


@pytest.mark.slow
def test_live_switches_and_worker_kill_with_zero_failures(deployment):
    url = deployment.url
    reference = reference_outputs(url)
    with LoadGenerator(url, reference) as load:
        for target in ({"replicas": 1}, {"tp": 2}, {"tp": 1}, {"replicas": 2}):
            before = load.ok
            job = deployment.reconfigure(**target)
            _print_job(job)
            assert job["state"] == "succeeded", job
            layout = deployment.status()["layout"]
            assert all(layout[k] == v for k, v in target.items())
            deadline = time.monotonic() + 60   # requests keep completing on the new generation
            while load.ok < before + 4 and time.monotonic() < deadline:
                time.sleep(0.2)
        # kill the new generation's engine process in the middle of a switch
        job = deployment._call("submit", {"tp": 2, "replicas": 1})
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline:
            st = deployment.status()
            for gen in st["generations"]:
                if gen["state"] == "starting" and gen["replicas"] and gen["replicas"][0]["pid"]:
                    killed = gen["replicas"][0]["pid"]
            time.sleep(0.05)
        assert killed, "never saw the new generation starting"
        os.kill(killed, signal.SIGKILL)
        while job["state"] == "running":
            time.sleep(0.2)
            job = deployment.job(job["id"])
        _print_job(job)
        assert job["state"] == "rolled_back" and "exited" in (job["error"] or ""), job   # killed while starting
        assert deployment.status()["layout"] == {"tp": 1, "ep": 1, "replicas": 2}
        time.sleep(1.0)
    print(f"\n  load: {load.ok} complete responses, {len(load.failures)} failed")
    assert not load.failures, load.failures[:5]
    assert load.ok > 20
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert "foundry_elastic_requests_failed_total 0" in metrics
    assert 'foundry_elastic_switch_phase_seconds_count{phase="wait_healthy"}' in metrics


@pytest.mark.slow
def test_invalid_reconfigurations_are_rejected_without_state_change(deployment):
    url = deployment.url
    before = requests.get(url + "/status", headers=AUTH, timeout=10).json()
    cases = [
        ('{"tp": 3, "replicas": 1}', AUTH, 400, "slots"),
        ('{"ep": 2, "replicas": 1}', AUTH, 400, "dense"),
        ('{"tp": 2, "bogus": 1}', AUTH, 400, "unknown key"),
        ('{"tp": 2', AUTH, 400, "malformed JSON"),
        ('{"tp": -1}', AUTH, 400, "positive integer"),
        ('{"tp": 1}', {}, 401, "missing bearer token"),
    ]
    for body, headers, status, needle in cases:
        r = requests.post(url + "/reconfigure", data=body, headers=headers, timeout=10)
        msg = r.json()["error"]["message"]
        print(f"\n  POST /reconfigure {body} -> {r.status_code} {msg}")
        assert r.status_code == status and needle in msg, (body, r.status_code, msg)
    with pytest.raises(LayoutError) as info:          # the Python API raises the same one-line error
        deployment.reconfigure(tp=3, replicas=1)
    assert "slots" in str(info.value) and "\n" not in str(info.value)
    r = requests.post(url + "/v1/completions", data="{oops", timeout=10)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    after = requests.get(url + "/status", headers=AUTH, timeout=10).json()
    assert before["generation"] == after["generation"] and before["layout"] == after["layout"]
    assert before["switches"] == after["switches"]


@pytest.mark.slow
def test_controller_crash_is_recovered_with_the_declared_layout(deployment):
    """Ray restarts a crashed controller actor; the supervisor brings it back on the same URL with the layout
    it last served (not the initial one), and requests are served again. The restarted controller opens its port
    before its generation is up, so a request sent then waits in its queue and is answered; two supervisors
    asking at once start it once."""
    job = deployment.reconfigure(replicas=1)
    assert job["state"] == "succeeded", job
    url = deployment.url
    ray.kill(deployment._actor, no_restart=False)        # a crash: Ray restarts the actor
    started, t_started = [], []

    def supervisors():  # two at once, asking again after a short time-out while the start still runs
        while not started and time.monotonic() < deadline:
            try:
                started.append(ray.get([deployment._actor.ensure_started.remote() for _ in range(2)], timeout=2))
                t_started.append(time.monotonic())
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                time.sleep(0.2)
    deadline = time.monotonic() + 240
    thread = threading.Thread(target=supervisors, daemon=True)
    thread.start()
    body = {"prompt": "while the controller comes back", "max_tokens": 4, "temperature": 0}
    while True:                                          # the first request the new port accepts
        t_sent = time.monotonic()
        try:
            early = requests.post(url + "/v1/completions", json=body, timeout=180)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "the restarted controller never opened its port"
            time.sleep(0.05)
    thread.join(240)
    assert early.status_code == 200, early.text
    assert started == [[url, url]]
    assert t_sent < t_started[0]          # accepted (and queued) before the restarted generation was up
    gens = deployment.status()["generations"]
    assert len(gens) == 1 and len(gens[0]["replicas"]) == 1, gens   # one start, not one per supervisor call
    deadline = time.monotonic() + 240
    status = {}
    while not status.get("recovered") and time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            if deployment.supervise():
                status = deployment.status()
        except ray.exceptions.RayActorError:     # still restarting
            pass
    assert status["layout"] == {"tp": 1, "ep": 1, "replicas": 1} and status["state"] == "serving", status
    assert deployment.url == url
    r = requests.post(url + "/v1/completions", json={"prompt": "after the crash", "max_tokens": 4,
                                                     "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_controller_gone_for_good_is_reported_in_one_line(deployment):
    """Runs last: a controller that Ray will not restart is ControllerLost (the launcher logs it and exits 1)."""
    from foundry_sglang.elastic.deployment import ControllerLost
    ray.kill(deployment._actor, no_restart=True)
    deadline = time.monotonic() + 60
    with pytest.raises(ControllerLost) as info:
        while time.monotonic() < deadline:
            deployment.supervise()
            time.sleep(0.5)
    assert "\n" not in str(info.value) and "died" in str(info.value)
