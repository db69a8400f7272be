# Sends a request every 10 ms on one TCP connection and checks that each answer continues the
# server's count. Writes its figures to STATUS (JSON) ten times a second. When STATUS.quit exists,
# sends "quit", records the server's answer ("bye N") and exits.
import json, os, socket, sys, time
addr, port, status = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stop = status + ".quit"
st = {"requests": 0, "answers": 0, "errors": 0, "last_error": None, "connections": 0,
      "first_answer": None, "last_answer": 0, "max_gap_ms": 0.0, "bye": None, "done": False}
def save():
    tmp = status + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.replace(tmp, status)
conn = None
last_ok = None
last_save = 0.0
while True:
    try:
        if conn is None:
            conn = socket.create_connection((addr, port), timeout=5)
            conn.settimeout(30)
            rf = conn.makefile("rb")
            st["connections"] += 1
        if os.path.exists(stop):
            conn.sendall(b"quit\n")
            st["bye"] = rf.readline().decode(errors="replace").strip()
            st["done"] = True
            save()
            sys.exit(0)
        conn.sendall(b"x\n")
        st["requests"] += 1
        line = rf.readline()
        if not line:
            raise OSError("connection closed by the server")
        n = int(line)
        if st["first_answer"] is None:
            st["first_answer"] = n
        elif n != st["last_answer"] + 1:
            raise OSError("answer %d after %d: server state lost" % (n, st["last_answer"]))
        now = time.monotonic()
        if last_ok is not None:
            st["max_gap_ms"] = max(st["max_gap_ms"], (now - last_ok) * 1000)
        last_ok = now
        st["answers"] += 1
        st["last_answer"] = n
    except (OSError, ValueError) as e:
        st["errors"] += 1
        st["last_error"] = "%s: %s" % (time.strftime("%H:%M:%S"), e)
        print("client: error:", e, flush=True)
        conn = None
        if os.path.exists(stop):
            st["done"] = True
            save()
            sys.exit(1)
        time.sleep(0.1)
    if time.monotonic() - last_save > 0.1:
        save()
        last_save = time.monotonic()
    time.sleep(0.01)
