# ftkit on a CUDA PyTorch image, for runpod pods (docs/runpod.md) or any GPU machine.
#
#   docker build -t ftkit:0.1.0 .
#   docker run --gpus all -v /data/workspace:/workspace ftkit:0.1.0                      # deploy/runpod/start.sh
#   docker run --gpus all -v /data/workspace:/workspace ftkit:0.1.0 ftkit train /workspace/recipes/my.toml --resume auto
#
# What the image adds over installing ftkit at every pod start: nothing is downloaded when a pod
# (re)starts, and a preempted run resumes on exactly the packages it started on.
#
# torch comes from the base image and stays: the installs below run under a constraint that pins it
# to the version the image has, so pip can neither swap it for another build nor upgrade it (ftkit
# asks for torch>=2.4). A base image without torch, or with an older one, fails the build instead.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HOME=/workspace/hf-cache \
    FTKIT_CACHE=/workspace/ftkit-cache

WORKDIR /opt/ftkit

# The dependencies first, from the metadata alone (an empty package), so that a code change does not
# reinstall transformers, peft and the rest.
COPY pyproject.toml README.md ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /opt/keep-torch.txt \
 && python -c "import torch; assert torch.version.cuda, 'the base image has a CPU-only torch'" \
 && pip install -c /opt/keep-torch.txt ".[torch]"

COPY ftkit ftkit
COPY backends backends
COPY deploy deploy
RUN pip install -c /opt/keep-torch.txt --no-deps --force-reinstall . \
 && python -c "import ftkit, ftkit_torch, torch, peft; print('ftkit', ftkit.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && chmod +x deploy/runpod/start.sh

WORKDIR /workspace
# The pod's start command. Any command given to `docker run` (or as runpod's start command) replaces it.
CMD ["bash", "/opt/ftkit/deploy/runpod/start.sh"]
