# Source side: a Slurm task process (child of a process named slurmstepd) that creates a
# container the way the SPANK plugin does and supervises it. argv: SOCK AGENT_BIN NODE ADDR
# Optional environment (attack tests): RB_JOB (job id, default 7), RB_UID (the task's owner,
# default 0), RB_FORGE_EARLY=1 (report a made-up end on this very connection while pid 1 runs,
# print the agent's answer, then go on as usual), RB_PROGRAM (the task's argv[0]).
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agentlib import Agent, libc, registration

sock, agent_bin, node = sys.argv[1], sys.argv[2], sys.argv[3]
a = Agent(sock, node)
me = os.getpid()
job = int(os.environ.get("RB_JOB", "7"))
cid = "j%d.s0.t0" % job
reg = registration(job, 0, me, node, cid)
reg["uid"] = int(os.environ.get("RB_UID", "0"))
if os.environ.get("RB_PROGRAM"):
    reg["program"] = os.environ["RB_PROGRAM"]
reg["address"] = sys.argv[4]
p = a.call({"op": "prepare-task", "registration": reg})["prepared"]
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: pid 1 comes back to us
server = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")).read()
spec = {"root": p["root"], "mounts": p["mounts"], "hostname": p["hostname"],
        "argv": ["python3", "-u", "-c", server], "env": [["PATH", "/usr/bin:/bin"]],
        "cwd": "/", "uid": 0, "gid": 0}
sr, sw = os.pipe()
gr, gw = os.pipe()
in_r, in_w = os.pipe()
out_r, out_w = os.pipe()
netfd = os.open(p["netns"], os.O_RDONLY)
child = os.fork()
if child == 0:
    if libc.setns(netfd, 0x40000000) != 0 or libc.unshare(0x00020000 | 0x20000000 | 0x04000000 | 0x08000000) != 0:
        os._exit(9)
    os.dup2(in_r, 0); os.dup2(out_w, 1); os.dup2(out_w, 2)
    os.dup2(sw, 3); os.dup2(gr, 4)
    os.execv(agent_bin, [agent_bin, "__container-init", json.dumps(spec)])
os.close(sw); os.close(gr); os.close(in_w); os.close(in_r); os.close(out_w); os.close(netfd)
f = os.fdopen(sr)
line = f.readline().strip()
os.waitpid(child, 0)
pid1 = int(line.split()[1])
reg["pid"] = pid1
a.call({"op": "register-task", "registration": reg})
os.write(gw, b"g"); os.close(gw)
rest = f.read()
if "err" in rest:
    print("container failed:", rest, flush=True)
    sys.exit(3)
print("registered", pid1, flush=True)
if os.environ.get("RB_FORGE_EARLY") == "1":
    try:
        a.call({"op": "task-exited", "container": cid, "wait_status": 0})
        print("forged-early accepted", flush=True)
    except RuntimeError as e:
        print("forged-early refused", e, flush=True)
_, st = os.waitpid(pid1, 0)
r = a.call({"op": "task-exited", "container": cid, "wait_status": st})
print("finished", json.dumps(r), flush=True)
