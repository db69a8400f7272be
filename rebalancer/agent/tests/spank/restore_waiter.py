# Destination side: the restore step's task. argv: SOCK MIGRATION NODE
import json, os, subprocess, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agentlib import Agent, registration

sock, migration, node = sys.argv[1], sys.argv[2], sys.argv[3]
a = Agent(sock, node)
me = os.getpid()
reg = registration(7, 1, me, node)
plan = a.call({"op": "prepare-restore", "migration": migration, "registration": reg})["plan"]
pidfile = "/tmp/restore-%s.pid" % migration
args = [plan["criu"]] + plan["args"] + ["--restore-detached", "--restore-sibling", "--pidfile", pidfile]
for i, k in enumerate(plan["stdio_keys"][:3]):
    if k:
        args += ["--inherit-fd", "fd[%d]:%s" % (i, k)]
keep = []
for key, path in plan["inherit_files"]:
    fd = os.open(path, os.O_RDONLY)
    keep.append(fd)
    args += ["--inherit-fd", "fd[%d]:%s" % (fd, key)]
rc = subprocess.run(args, pass_fds=keep).returncode
print("criu restore rc", rc, flush=True)
if rc != 0:
    sys.exit(1)
pid = int(open(pidfile).read())
os.unlink(pidfile)
reg["pid"] = pid
reg["container"] = plan["container"]
a.call({"op": "register-task", "registration": reg})
print("registered", pid, flush=True)
_, st = os.waitpid(pid, 0)
r = a.call({"op": "task-exited", "container": plan["container"], "wait_status": st})
print("finished", json.dumps(r), flush=True)
