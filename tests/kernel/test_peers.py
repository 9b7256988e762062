"""kernel/peers.py: peers bound to their connection, when fd numbers are reused."""
import os
import socket
import time

from llmos.kernel import peers as peers_mod
from llmos.kernel.peers import PeerTable


def _drop(peer, why):
    raise AssertionError(f"nobody should be dropped: {peer!r} ({why})")


def reconnect(sock: socket.socket, far: socket.socket) -> tuple[socket.socket, socket.socket]:
    """Close the pair (sock, far) and return a new pair whose first socket has sock's fd
    number, as the kernel hands a new connection the lowest free fd."""
    fd = sock.fileno()
    sock.close()
    far.close()
    new, new_far = socket.socketpair()
    if new.fileno() != fd:                      # another thread took it meanwhile
        os.dup2(new.fileno(), fd)
        new.close()
        new = socket.socket(fileno=fd)
    return new, new_far


def test_a_late_disconnect_of_a_reused_fd_spares_the_new_connection(monkeypatch):
    # A client exits and another connects at once: the kernel gives the new connection
    # the old fd number before the monitor's DISCONNECTED of the old one is read. That
    # event must not drop the newcomer (it got "say hello first" on its next call).
    monkeypatch.setattr(peers_mod, "RECHECK", 0.0)
    table = PeerTable()
    old, old_far = socket.socketpair()
    fd = old.fileno()
    table.admit(b"old", fd, _drop)
    new, new_far = reconnect(old, old_far)
    dropped = []
    conn = table.admit(b"new", fd, lambda peer, why: dropped.append(table.remove(peer).peer))
    assert dropped == [b"old"]                  # one live connection per fd: the old one went
    assert table.disconnected(fd) is None       # the event of the old connection: spared
    assert table.due() == [] and table.by_id[b"new"] is conn
    new_far.close()                             # now the new one's other end hangs up
    assert table.disconnected(fd) == b"new"
    new.close()


def test_a_disconnect_while_libzmq_still_holds_the_fd_is_looked_at_again(monkeypatch):
    monkeypatch.setattr(peers_mod, "RECHECK", 0.05)
    table = PeerTable()
    a, b = socket.socketpair()
    fd = a.fileno()
    table.admit(b"p", fd, _drop)
    assert table.disconnected(fd) is None       # still open, nobody hung up: later
    assert table.due() == []                    # not due yet
    a.close()                                   # libzmq closes it just after its event
    time.sleep(0.06)
    assert table.due() == [b"p"]
    b.close()


def test_a_routing_id_reused_on_a_new_socket_with_the_old_fd_number_starts_afresh():
    # The old connection closed and a new one got its fd number; the newcomer sends the old
    # peer's routing id before the kernel has read the close: it must not inherit the state.
    table = PeerTable()
    a, a_far = socket.socketpair()
    fd = a.fileno()
    old = table.admit(b"id", fd, _drop)
    old.authenticated, old.owner = True, True
    b, b_far = reconnect(a, a_far)
    dropped = []
    new = table.admit(b"id", fd, lambda peer, why: dropped.append(table.remove(peer)))
    assert dropped == [old] and new is not old and not new.authenticated and not new.owner
    b.close()
    b_far.close()


def test_a_silent_connection_is_hung_up_after_the_guest_ttl_and_a_talking_one_is_not():
    table = PeerTable(max_guests=8, guest_ttl=0.0)
    quiet, quiet_far = socket.socketpair()
    talker, talker_far = socket.socketpair()
    table.accepted(talker.fileno())
    table.admit(b"talker", talker.fileno(), _drop)     # its first message: not silent now
    table.accepted(talker.fileno())                    # a late ACCEPTED changes nothing
    table.accepted(quiet.fileno())
    time.sleep(0.01)
    table.hang_up_silent()
    quiet_far.settimeout(5)
    assert quiet_far.recv(1) == b""                    # hung up: the far end reads EOF
    talker_far.setblocking(False)
    try:
        talker_far.recv(1)
        raise AssertionError("the talking connection was hung up")
    except BlockingIOError:
        pass                                            # still open, nothing to read
    for s in (quiet, quiet_far, talker, talker_far):
        s.close()
