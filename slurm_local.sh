#!/usr/bin/env bash
# A real one-node Slurm on this machine (Debian's slurm-wlm and munge), to run docs/reproduce.md's job array as a
# cluster would: installs, writes /etc/slurm/slurm.conf for this node's cores and memory, starts munged, slurmctld
# and slurmd, and checks sinfo. Not part of CI. As root:  bash slurm_local.sh   (then: sbatch demo_grid.sbatch)
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
fi
node=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, 1 GB left to the system
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
if [ -s /etc/slurm/slurm.conf ]; then  # a configuration already there is kept aside, never lost
    cp -p /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.bak.$(date +%Y%m%d-%H%M%S)"
    echo "kept the existing /etc/slurm/slurm.conf as /etc/slurm/slurm.conf.bak.*"
fi
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$node
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
[ -s /etc/munge/munge.key ] || (mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 \
    of=/etc/munge/munge.key 2>/dev/null)
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do  # the node registers within seconds
    sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|allocated" && break
    sleep 1
done
sinfo -N -o "%N %T %c %m"
scontrol show node "$node" | grep -E "CPUTot|RealMemory"
