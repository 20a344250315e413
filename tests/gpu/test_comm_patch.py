"""comm_patch on real NCCL (check_comm_patch.py, which stays runnable by hand): TP/EP decode graphs restored in
every rank from one single-GPU capture, bitwise equal to live-captured TP graphs; both ranks on one GPU, or
rank r on GPU r; four ranks on one GPU (TP=4 dense, EP=4 MoE); what a template costs against one live capture."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("gpus", [1, pytest.param(2, marks=pytest.mark.two_gpu)], ids=["one_gpu", "two_gpus"])
def test_comm_patch(gpus, run_script, verdicts):
    run_script("check_comm_patch.py", "--gpus", str(gpus), record="check_comm_patch.json", timeout=590)
    verdicts.assert_passed()


@pytest.mark.parametrize("skip", ["d", "b,c"], ids=["tp4", "ep4"])  # TP=4 dense (and (c)), EP=4 MoE
def test_comm_patch_four_ranks_one_gpu(skip, run_script, verdicts):
    run_script("check_comm_patch.py", "--gpus", "1", "--ranks", "4", "--skip", skip, record="check_comm_patch.json",
               timeout=590)
    verdicts.assert_passed()


def test_template_costs(run_script, verdicts):
    run_script("check_comm_patch.py", "--gpus", "1", "--template-costs", record="check_comm_patch.json", timeout=590)
    verdicts.assert_passed()
