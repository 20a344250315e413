"""GPU tests (README.md). A package, so that its modules import each other as ``gpu.<module>`` in pytest, in the
fresh processes the tests start and in the two scripts (check_comm_patch.py, check_sglang_server.py)."""
