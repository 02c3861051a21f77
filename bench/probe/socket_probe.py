# Probe: what this host's loopback carries without gRPC, the floor under issue 17's inline rows.
# Each connection does what an activation call does to the bytes: the client sends a 34 MB
# message, the server reads all of it, then sends 34 MB back (Forward's input and output of the
# span's micro-batch); 1 and 3 connections at once, over TCP and a Unix socket. Plain sockets,
# no framing beyond a length, no copies beyond the kernel's: gRPC cannot beat these numbers.
#   python3 bench/probe/socket_probe.py [--mb=34] [--rounds=6]
import os, socket, sys, threading, time

MB = 34
ROUNDS = 6
for a in sys.argv[1:]:
    if a.startswith("--mb="):
        MB = int(a[5:])
    elif a.startswith("--rounds="):
        ROUNDS = int(a[9:])
N = MB << 20
CHUNK = 4 << 20


def recv_exactly(s, view):
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:got + CHUNK])
        if n == 0:
            raise EOFError("peer closed")
        got += n


def serve(conn):
    buf = bytearray(N)
    view = memoryview(buf)
    with conn:
        for _ in range(ROUNDS + 1):
            recv_exactly(conn, view)
            conn.sendall(view)


def client(sock, times, warm):
    buf = bytearray(os.urandom(1 << 20) * MB)
    view = memoryview(buf)
    back = memoryview(bytearray(N))
    for r in range(ROUNDS + 1):
        if r == 1:  # the first round warms the buffers; the timed rounds start together
            warm.wait()
        t = time.perf_counter()
        sock.sendall(view)
        recv_exactly(sock, back)
        if r:
            times.append(time.perf_counter() - t)


def run(family, address, connections):
    listener = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(connections)
    bound = listener.getsockname()
    servers, clients, times = [], [], []
    socks = []
    for _ in range(connections):
        c = socket.socket(family, socket.SOCK_STREAM)
        c.connect(bound)
        if family == socket.AF_INET:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn, _ = listener.accept()
        socks.append(c)
        servers.append(threading.Thread(target=serve, args=(conn,)))
    per = [[] for _ in range(connections)]
    warm = threading.Barrier(connections + 1)
    clients = [threading.Thread(target=client, args=(socks[i], per[i], warm)) for i in range(connections)]
    for t in servers + clients:
        t.start()
    warm.wait()
    t0 = time.perf_counter()
    for t in clients + servers:
        t.join()
    wall = time.perf_counter() - t0
    listener.close()
    for c in socks:
        c.close()
    times = sorted(x for p in per for x in p)
    median = times[len(times) // 2]
    # Both directions' bytes of the timed rounds, all connections, over their wall time.
    total = 2 * N * ROUNDS * connections
    return median, total / wall / 1e9


def main():
    path = "/tmp/blockd-socket-probe.sock"
    print(f"socket probe: {MB} MB request, {MB} MB reply per round, {ROUNDS} rounds (median round trip; both directions' bytes per second, all connections)")
    for name, family, address in (("TCP loopback", socket.AF_INET, ("127.0.0.1", 0)),
                                  ("Unix socket", socket.AF_UNIX, path)):
        for connections in (1, 3):
            if family == socket.AF_UNIX and os.path.exists(path):
                os.unlink(path)
            median, rate = run(family, address, connections)
            print(f"socket probe {name:13s} {connections} connection(s): round trip {median * 1e3:7.2f} ms, "
                  f"{2 * N / median / 1e9:5.2f} GB/s per connection, {rate:5.2f} GB/s all")
    if os.path.exists(path):
        os.unlink(path)


if __name__ == "__main__":
    main()
