# An attacker on the control socket: sends one request and prints what the agent said.
# argv: SOCK NODE OP CONTAINER [WAIT_STATUS_OR_SIGNAL]. Prints "accepted JSON" or "refused JSON".
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agentlib import Agent

sock, node, op, cid = sys.argv[1:5]
n = int(sys.argv[5]) if len(sys.argv) > 5 else 0
a = Agent(sock, node)
req = {"op": op, "container": cid, "wait_status": n} if op == "task-exited" else \
      {"op": op, "id": cid, "signal": n}
try:
    print("accepted", json.dumps(a.call(req)), flush=True)
except RuntimeError as e:
    print("refused", e, flush=True)
