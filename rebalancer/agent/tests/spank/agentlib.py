# Minimal control-socket client for the SPANK-path test (what the SPANK plugin does, in Python).
import ctypes, json, os, socket, struct

libc = ctypes.CDLL(None, use_errno=True)

def frame(kind, rid, obj):
    p = json.dumps(obj).encode()
    return struct.pack(">IHHII", 0x5352424C, 1, kind, len(p), rid) + p

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("agent closed")
        b += c
    return b

class Agent:
    def __init__(self, path, node):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.id = 1
        self.s.sendall(frame(1, 0, {"protocol": 1, "software": "fake-spank", "role": "spank", "node": node}))
        self.read()

    def read(self):
        h = recv_exact(self.s, 16)
        kind, n = struct.unpack(">IHHII", h)[2], struct.unpack(">IHHII", h)[3]
        return kind, json.loads(recv_exact(self.s, n))

    def call(self, req):
        self.id += 1
        self.s.sendall(frame(2, self.id, req))
        while True:
            kind, obj = self.read()
            if kind == 3:
                if "error" in obj:
                    raise RuntimeError(json.dumps(obj["error"]))
                return obj["ok"]

def registration(job, step, pid, node, container=None):
    return {"task": {"job_id": job, "step_id": step, "task_id": 0}, "pid": pid, "uid": 0, "gid": 0,
            "node": node, "class": None, "cpus": None, "memory_limit": None,
            "container": container, "cwd": "/tmp"}
