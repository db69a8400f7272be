# shellcheck shell=bash
# The part of slurm.conf that every test cluster of this project shares, for slurm-tests/cluster.sh
# and spank-plugin/tests/minicluster.sh (source this file). Every daemon runs as root, munge
# authenticates through a private socket, and all state lives under one directory DIR:
#   DIR/munge/munge.socket, DIR/slurmctld, DIR/slurmd/<node>, DIR/run/*.pid, DIR/log/*.log,
#   DIR/plugstack.conf.
#
#   slurm_conf_common DIR CLUSTER_NAME CTLD_HOST PROCTRACK TASK [SPOOL PIDFILE]
#
# prints those lines; the caller appends its own (ports, accounting, nodes, partitions). SPOOL and
# PIDFILE replace slurmd's DIR/slurmd/%n and DIR/run/slurmd-%n.pid: a cluster whose nodes each
# have a private file system passes a node-local spool (cluster.sh: /var/spool/slurmd).
slurm_conf_common() {
  local dir=$1 name=$2 host=$3 proctrack=$4 task=$5
  local spool=${6:-$dir/slurmd/%n} pidfile=${7:-$dir/run/slurmd-%n.pid}
  cat <<EOF
ClusterName=$name
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/slurmctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/$proctrack
TaskPlugin=task/$task
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=2
EOF
}
