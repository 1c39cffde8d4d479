#!/usr/bin/env bash
# The whole idea on one screen: install, build one kernel both ways, show what
# the paravirtualization pass changed, check and run the PV image on the
# bundled hypervisor, then measure bare vs trap-and-emulate vs paravirtualized.
#   bash scripts/demo.sh [KERNEL.pvk]      (default: kernels/churn.pvk)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
kernel=${1:-kernels/churn.pvk}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pvtool() { python3 -m pvtool "$@"; }
step() { printf '\n== %s\n' "$*"; }

step "pvtool build $kernel --target native  and  --target pv"
pvtool build "$kernel" --target native -o "$out/native.elf"
pvtool build "$kernel" --target pv -o "$out/pv.elf"
echo "native: $(stat -c %s "$out/native.elf") bytes    pv: $(stat -c %s "$out/pv.elf") bytes"

step "pvtool check: sensitive instructions left in each image"
pvtool check "$out/native.elf" | tail -n 3 || true
pvtool check "$out/pv.elf"

step "pvtool diff --summary: what each sensitive site became"
pvtool diff "$out/native.elf" "$out/pv.elf" --summary --color never | sed -n '/^summary/,/^exits avoided/p'

step "pvtool run (paravirtualized, --stats)"
pvtool run "$out/pv.elf" --stats

step "pvtool bench $kernel --repeat 3"
pvtool bench "$kernel" --repeat 3
