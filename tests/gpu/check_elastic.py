"""Live elastic switches under load, by hand (the same run as tests/gpu/test_elastic.py; elastic_switches.py says
what it does). ``--help`` lists the options; the verdict table comes last and goes to ``$OUT/elastic.json``'s
folder as ``check_elastic.json``.

    python3 tests/gpu/check_elastic.py --out DIR [--worker sglang] [--backend ray] [--share-gpu] [--standby 1]
        [--standby-coreside]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gpu.*
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tools, bench (also without PYTHONPATH)

from gpu.elastic_switches import build_parser, run_switches  # noqa: E402
from gpu.records import write_record  # noqa: E402
from gpu.verdicts import Row, Verdicts  # noqa: E402
from tools.needs_gpu import exit_without_gpu  # noqa: E402


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exit_without_gpu("this check")
    argv = list(sys.argv[1:] if argv is None else argv)
    share = True if args.share_gpu else None
    result = run_switches(args.out, args.backend, args.standby, args.worker, share, args.models,
                          *[a for a in argv if a not in ("--share-gpu",)])
    verdicts = Verdicts("check_elastic", [Row(*r) for r in result["rows"]], result["figures"], echo=False)
    import torch

    write_record(Path(args.out) / "check_elastic.json", verdicts, device=torch.cuda.get_device_name(0))
    print("\n" + verdicts.table())
    return 1 if verdicts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
