#!/usr/bin/env bash
# Train SparseWSI on every worker of a Cloud TPU pod slice (one process per host, jax.distributed).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra `sparsewsi train` args...]
#   bash launch/tpu_pod.sh my-v4-32 us-central2-b "configs/stage1_caption.py:llm=/models/Qwen2.5-7B-Instruct,data=/data/tfds/slide_instruction/stage1/1.0.0" gs://bucket/runs/stage1
#
# The repository must be at the same path on every worker (e.g. cloned there by this script's
# SPARSEWSI_SYNC step) and WORKDIR on storage all hosts see (a gs:// bucket or a shared disk):
# orbax writes the checkpoints from all hosts, process 0 writes the metrics. jax.distributed
# auto-detects the pod (coordinator, process count and id), so every worker runs the same command.
# Re-running the script resumes from the newest valid checkpoint in WORKDIR.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
repo_dir="${SPARSEWSI_REMOTE_DIR:-\$HOME/sparsewsi}"
repo_url="${SPARSEWSI_REPO_URL:-}"

quoted_args=""
for a in "$@"; do quoted_args+=" $(printf '%q' "$a")"; done

remote="set -euo pipefail
if [ -n '${repo_url}' ] && [ ! -d ${repo_dir} ]; then git clone '${repo_url}' ${repo_dir}; fi
cd ${repo_dir}
bash launch/local.sh train --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir") --distributed on${quoted_args}"

exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote"
