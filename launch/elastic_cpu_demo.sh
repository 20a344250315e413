#!/usr/bin/env bash
# CPU demo of live switching: two CPU slots, the built-in tiny model, local Ray.
#   bash launch/elastic_cpu_demo.sh            then, in another shell:
#   curl -s localhost:8000/v1/completions -d '{"prompt": "hi", "max_tokens": 8, "temperature": 0}'
#   curl -s -X POST localhost:8000/reconfigure -d '{"tp": 2, "replicas": 1}'; curl -s localhost:8000/status
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m foundry_sglang.elastic.launch --model builtin:tiny --device cpu --slots 2 --tp 1 --replicas 2 \
  --num-cpus 4 --port 8000 "$@" -- --num-kv-pages 512
