#!/usr/bin/env bash
# The start command of a runpod pod that trains an ftkit recipe. Safe to run on every (re)start:
#   - uses the ftkit of the image when it has one (the repository's Dockerfile); otherwise installs
#     ftkit once into a venv on the volume that sees the image's CUDA torch (pip may not replace it);
#   - runs `ftkit train RECIPE --backend torch --resume auto` (`ftkit launch` for several GPUs):
#     a fresh run folder starts, a preempted run continues from its newest complete checkpoint,
#     a finished run is reported and not retrained;
#   - passes a signal it gets (SIGTERM: the pod is stopping; SIGINT; SIGUSR1) on to ftkit, which
#     finishes its step, writes a checkpoint and exits 75 ("resume me"), and waits for that; it then
#     exits 75 itself, and the next start goes on from the checkpoint. ftkit exiting 75 when this
#     script got no signal (someone signalled ftkit itself) starts it again with --resume auto;
#   - exits with ftkit's exit code (or stops the pod / sleeps: FTKIT_WHEN_DONE).
#
# Usage: start.sh [RECIPE.toml ...] [ftkit train options]        (no arguments: $FTKIT_RECIPE)
#
# Environment (all optional; docs/runpod.md has the whole picture):
#   WORKSPACE        the volume's mount point                                    (/workspace)
#   FTKIT_RECIPE     recipe file(s), space-separated (several run as stages)     ($WORKSPACE/recipes/train.toml)
#   FTKIT_ARGS       more `ftkit train` options, e.g. "--set train.save_every=200"
#   FTKIT_NPROC      training processes on this pod: 1, N, or auto (one per GPU)  (1)
#   FTKIT_SRC        the ftkit checkout installed when the image has no ftkit    ($WORKSPACE/ftkit)
#   FTKIT_GIT_URL    clone ftkit from here when FTKIT_SRC is missing (FTKIT_GIT_REF: tag or commit)
#   FTKIT_VENV       the venv it is installed into                               ($WORKSPACE/venv)
#   FTKIT_WHEN_DONE  exit: exit with ftkit's exit code | stop: stop this pod once ftkit exits,
#                    whatever its exit code (logged) | sleep: keep the pod up for a look around  (exit)
#   FTKIT_LOG_DIR    ftkit's output is appended to a file here too ("" = none)   ($WORKSPACE/logs)
#   FTKIT_MAX_RESTARTS  times ftkit is started again after exiting 75 on its own  (10)
#   HF_HOME, FTKIT_CACHE, PIP_CACHE_DIR: caches, on the volume so that they outlive the pod.
#   HF_TOKEN (gated models: huggingface_hub reads it itself), WANDB_API_KEY: secrets; never printed.
set -euo pipefail

WORKSPACE=${WORKSPACE:-/workspace}
FTKIT_SRC=${FTKIT_SRC:-$WORKSPACE/ftkit}
FTKIT_VENV=${FTKIT_VENV:-$WORKSPACE/venv}
FTKIT_WHEN_DONE=${FTKIT_WHEN_DONE:-exit}
export HF_HOME=${HF_HOME:-$WORKSPACE/hf-cache}
export FTKIT_CACHE=${FTKIT_CACHE:-$WORKSPACE/ftkit-cache}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$WORKSPACE/pip-cache}
export PYTHONUNBUFFERED=1

say() { echo "[start.sh $(date -u +%H:%M:%S)] $*" >&2; }
die() { say "error: $*"; exit 2; }

case "$FTKIT_WHEN_DONE" in exit|stop|sleep) ;; *) die "FTKIT_WHEN_DONE=$FTKIT_WHEN_DONE: use exit, stop or sleep" ;; esac
nproc=${FTKIT_NPROC:-1}
if [ "$nproc" = auto ]; then
  nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${nproc:-0}" -ge 1 ] || nproc=1
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "FTKIT_NPROC=$FTKIT_NPROC: use a number of processes, or auto"

# An empty secret, or a runpod placeholder left unresolved (no secret of that name), would be sent as
# a token and fail even for public models: drop it. Values are never printed.
for name in HF_TOKEN HUGGING_FACE_HUB_TOKEN WANDB_API_KEY; do
  if [ -z "${!name-}" ] || [[ "${!name}" == "{{"* ]]; then unset "$name"; fi
done

# ---------------------------------------------------------------- ftkit
PY=$(command -v python3 || command -v python) || die "no python in this image"
has_ftkit() {  # installed, without the seconds an import of torch takes
  "$1" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('ftkit', 'ftkit_torch', 'torch', 'peft')))" 2>/dev/null
}

if has_ftkit "$PY" && command -v ftkit >/dev/null; then
  say "ftkit from the image: $(command -v ftkit)"
else
  if [ ! -f "$FTKIT_SRC/pyproject.toml" ]; then
    [ -n "${FTKIT_GIT_URL:-}" ] || die "no ftkit in this image and no checkout at $FTKIT_SRC: copy ftkit there, or set FTKIT_GIT_URL"
    say "cloning $FTKIT_GIT_URL into $FTKIT_SRC"
    git clone --quiet "$FTKIT_GIT_URL" "$FTKIT_SRC"
    if [ -n "${FTKIT_GIT_REF:-}" ]; then git -C "$FTKIT_SRC" checkout --quiet "$FTKIT_GIT_REF"; fi
  fi
  torch_version=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null) \
    || die "this image has no torch: use a CUDA PyTorch image (runpod/pytorch, pytorch/pytorch); ftkit never picks a torch build itself"
  # Install again only when the dependencies, the image's python or its torch changed; code changes
  # need nothing (an editable install).
  want="$(sha256sum < "$FTKIT_SRC/pyproject.toml" | cut -c1-16) $("$PY" -V 2>&1) torch $torch_version"
  stamp="$FTKIT_VENV/.ftkit-installed"
  if ! { [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && has_ftkit "$FTKIT_VENV/bin/python"; }; then
    say "installing ftkit from $FTKIT_SRC into $FTKIT_VENV, keeping the image's torch $torch_version"
    "$PY" -m venv --clear --system-site-packages "$FTKIT_VENV" \
      || die "could not make a venv (is python3-venv installed in the image?)"
    keep=$(mktemp)
    echo "torch==$torch_version" > "$keep"   # a constraint: pip may neither replace nor upgrade torch
    "$FTKIT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$keep" -e "$FTKIT_SRC[torch]"
    rm -f "$keep"
    has_ftkit "$FTKIT_VENV/bin/python" || die "the install gave no working ftkit (pip's output is above)"
    echo "$want" > "$stamp"
  fi
  export PATH="$FTKIT_VENV/bin:$PATH"
fi

# ---------------------------------------------------------------- the run
cd "$WORKSPACE"   # a recipe without output.dir writes to $WORKSPACE/runs/<recipe name>
if [ $# -gt 0 ]; then
  args=("$@")
else
  read -r -a args <<< "${FTKIT_RECIPE:-$WORKSPACE/recipes/train.toml}"
fi
read -r -a extra <<< "${FTKIT_ARGS:-}"
if [ "$nproc" -gt 1 ]; then
  cmd=(ftkit launch "${args[@]}" --nproc-per-node "$nproc" --backend torch --resume auto "${extra[@]}")
else
  cmd=(ftkit train "${args[@]}" --backend torch --resume auto "${extra[@]}")
fi

log=/dev/null
if [ -n "${FTKIT_LOG_DIR-$WORKSPACE/logs}" ]; then
  mkdir -p "${FTKIT_LOG_DIR-$WORKSPACE/logs}"
  log="${FTKIT_LOG_DIR-$WORKSPACE/logs}/$(basename "${args[0]}" .toml)-$(date -u +%Y%m%d-%H%M%S).log"
fi
# ftkit runs in its own process group (setsid), in the background, so that this script can pass a
# signal on to all of it (`ftkit launch`: the launcher and every training process) and wait until the
# checkpoint is written: when PID 1 of a container exits, every other process in it is killed.
EXIT_RESUME=75  # ftkit's "stopped by a signal after writing a checkpoint: resume me" (EX_TEMPFAIL)
max_restarts=${FTKIT_MAX_RESTARTS:-10}
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "FTKIT_MAX_RESTARTS=$max_restarts: use a number"
signalled="" got="" pid=""
forward() {
  signalled=$1 got=1
  say "got SIG$1: passing it on to ftkit, which finishes its step, writes a checkpoint and exits $EXIT_RESUME" 2>&1 | tee -a "$log" >&2
  if [ -n "$pid" ]; then kill -s "$1" -- "-$pid" 2>/dev/null || kill -s "$1" "$pid" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1

group=(setsid)
command -v setsid >/dev/null || group=()  # without it the signal reaches ftkit's first process only
restarts=0
while :; do
  say "${cmd[*]}" 2>&1 | tee -a "$log" >&2
  # tee ignores the signals: it must keep copying ftkit's last words
  "${group[@]}" "${cmd[@]}" > >(trap '' INT TERM USR1; exec tee -a "$log") 2>&1 &
  pid=$!
  while :; do  # a trapped signal ends `wait` early: wait again, for ftkit's own exit code
    got=""
    set +e; wait "$pid"; rc=$?; set -e
    [ -n "$got" ] || break
  done
  while kill -0 -- "-$pid" 2>/dev/null; do sleep 0.2; done  # the rest of its process group (ftkit launch)
  say "ftkit exited with $rc" 2>&1 | tee -a "$log" >&2
  if [ -n "$signalled" ]; then
    say "stopping on SIG$signalled; the next start goes on from the checkpoint (--resume auto)" 2>&1 | tee -a "$log" >&2
    exit "$rc"
  fi
  if [ "$rc" -eq "$EXIT_RESUME" ] && [ "$restarts" -lt "$max_restarts" ]; then
    restarts=$((restarts + 1))
    say "ftkit stopped with a checkpoint (exit $EXIT_RESUME): starting it again with --resume auto ($restarts of at most $max_restarts)" 2>&1 | tee -a "$log" >&2
    continue
  fi
  break
done
trap - TERM INT USR1  # from here a signal ends this script as usual (sleep infinity too)

case "$FTKIT_WHEN_DONE" in
  stop)
    # Success or failure alike: a pod that exits may be restarted, and a failing recipe would then
    # fail again and again on a billed GPU. The exit code is in the log above.
    if [ -n "${RUNPOD_POD_ID:-}" ] && command -v runpodctl >/dev/null; then
      say "stopping pod $RUNPOD_POD_ID (ftkit exited with $rc)" 2>&1 | tee -a "$log" >&2
      runpodctl stop pod "$RUNPOD_POD_ID" || say "runpodctl stop pod failed"
    else
      say "FTKIT_WHEN_DONE=stop: no RUNPOD_POD_ID or runpodctl here, so exiting instead"
    fi
    ;;
  sleep)
    say "keeping the pod up (ftkit exited with $rc); stop it when done"
    sleep infinity
    ;;
esac
exit "$rc"
