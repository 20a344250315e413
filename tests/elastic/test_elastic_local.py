"""The local-process backend (what the GPU check uses, no Ray) with the real built-in engine on CPU."""
import requests

from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment


def test_local_backend_switch_tp_with_real_engine(tmp_path):
    cfg = DeploymentConfig(model="builtin:tiny", slots=2, tp=1, replicas=1, backend="local", port=0,
                           log_dir=str(tmp_path), extra_args=["--num-kv-pages", "256"],
                           env={"OMP_NUM_THREADS": "1"}, start_timeout=120)
    body = {"prompt": "local backend", "max_tokens": 8, "temperature": 0}
    with ElasticDeployment(cfg) as dep:
        before = requests.post(dep.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        job = dep.reconfigure(tp=2)
        print(f"\n  local backend TP1->TP2: {job['strategy']} {job['phases_s']}")
        assert job["state"] == "succeeded", job
        pids = [r["pid"] for g in dep.status()["generations"] for r in g["replicas"]]
        assert len(pids) == 1
        after = requests.post(dep.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert after == before
