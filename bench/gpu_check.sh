#!/usr/bin/env bash
# GPU check for the probe and the planner: run on a CUDA machine from the repo root.
#   bash bench/gpu_check.sh
# The GPU machine may have torch/transformers/accelerate but not prefect, mlflow or pydantic:
#   - tasks/hardware.py falls back to a no-op @task without prefect;
#   - pydantic (and its deps) can be carried as wheels in $GPU_WHEELS (default out/gpu-wheels), e.g.
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#       -d out/gpu-wheels pydantic pydantic_core annotated_types typing_inspection typing_extensions
# --noconftest: these three files need no fixtures from tests/conftest.py, which imports the rest of
# the stack (prefect, mlflow, the test hub) that the GPU machine may lack.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
GPU_WHEELS="${GPU_WHEELS:-out/gpu-wheels}"

if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    if ls "$GPU_WHEELS"/*.whl >/dev/null 2>&1; then
        site="$(mktemp -d)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$GPU_WHEELS"/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "pydantic is missing and $GPU_WHEELS holds no wheels: pip install pydantic, or carry its wheels there" >&2
        exit 2
    fi
fi

"$PYTHON" - <<'PY'
from lora_prep.tasks.machine.hardware import format_profile, probe_hardware
print(format_profile(probe_hardware()))
PY
exec "$PYTHON" -m pytest tests/test_gpu.py tests/test_plan.py tests/test_hardware.py -q -m "gpu or not gpu" \
    --noconftest -p no:cacheprovider -rs "$@"
