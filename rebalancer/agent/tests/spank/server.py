import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(4)
while True:
    c, _ = s.accept()
    f = c.makefile("rb")
    n = 0
    for line in f:
        n += 1
        c.sendall(b"%d\n" % n)
    c.close()
