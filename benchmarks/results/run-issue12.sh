#!/usr/bin/env bash
# Both issue-12 experiments, one after the other, at the lowest CPU priority; rerun to resume.
set -uo pipefail
cd "$(dirname "$0")"
nice -n 19 bash cifar10-limited500-resnet20-w3a3/run.sh && nice -n 19 bash cifar100-resnet56-w4a4/run.sh
