"""Worker command lines are logged without the secrets they may carry (CPU, no process is started)."""
from __future__ import annotations

import logging

from foundry_sglang.elastic import workers


class _Popen:
    def __init__(self, cmd, **kwargs):
        self.cmd, self.pid = cmd, 4242


def test_worker_command_line_is_logged_without_the_api_key(monkeypatch, caplog):
    """Before: the full command line, --api-key value included, went to the log."""
    monkeypatch.setattr(workers.subprocess, "Popen", _Popen)
    spec = workers.WorkerSpec(model="builtin:tiny", extra_args=["--api-key", "sk-secret-1", "--hf-token=hf_secret_2",
                                                                "--max-num-seqs", "8"])
    worker = workers.ProcessWorker()
    with caplog.at_level(logging.INFO, logger=workers.log.name):
        worker.start(spec, port=12345)
    assert "--api-key" in worker.proc.cmd and "sk-secret-1" in worker.proc.cmd  # the server still gets its key
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "starting worker" in logged and "--max-num-seqs 8" in logged
    assert "sk-secret-1" not in logged and "hf_secret_2" not in logged
    assert "--api-key ***" in logged and "--hf-token=***" in logged
