#!/usr/bin/env bash
# ftkit's GPU run, ready to go: on one CUDA GPU, in under 8 minutes, the GPU-marked tests, bench/gpu_check.py
# (QLoRA nf4 + paged AdamW 8-bit + bf16 + checkpointing on a 1.1B Llama), a 1-GPU FSDP smoke through
# `ftkit launch`, and bench/speed.py --cuda (ftkit vs Trainer+PEFT); then one table (tokens/s, MFU, peak
# memory, ftkit/Trainer ratios), exit status 1 if any part failed. The work is in bench/gpu_all.py.
#
#   bash bench/gpu_all.sh                        # on the GPU machine
#   bash bench/gpu_all.sh --dry-run              # on a CPU: the plumbing only (or FTKIT_GPU_DRY_RUN=1)
#   bash bench/gpu_all.sh --only gpu_check,fsdp --budget gpu_check=200 --out report.json
#   PYTHON=/path/to/python bash bench/gpu_all.sh # another interpreter (default: python3)
#
# It needs no install of ftkit and no virtual environment: a python3 with torch, transformers, peft and
# accelerate (the CUDA image's own) and PYTHONPATH, set here, for ftkit and ftkit_torch. What the image
# lacks comes from wheels placed beside the repo, installed without network access only when missing:
# .whl/ or bench/wheels/ (or $FTKIT_WHEELS). Fetch them once on a machine with pip and network, for the
# GPU machine's Python (3.12, x86-64), from the repo root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .whl \
#     bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 tomli-w==1.2.0 typing-extensions==4.16.0
#
# (about 47 MB; .whl/ is git-ignored). With this workplace's device tool, the lead's call is
#   run(command="set -o pipefail; bash bench/gpu_all.sh --out $OUT/gpu_all.json 2>&1 | tee $OUT/gpu_all.log",
#       carry=[".whl"], timeout_s=560)
# and the table is the end of its output. The parts' logs and results stay in the work folder it prints.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/backends/torch${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_all.py "$@"
