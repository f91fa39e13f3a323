"""Linux network namespaces joined by a bridge, so that one machine can host several SLURM "nodes".

``veth_namespaces(["n1", "n2"])`` creates, for this process only (every name carries the pid):

* a bridge ``nsbr<pid>`` in the root namespace holding the subnet's first address (``10.77.X.1``),
  where slurmctld listens (``LocalSlurm(controller=topo.gateway)``);
* per name a namespace ``slurm-<name>-<pid>`` with ``lo`` up and one veth, always called ``veth0``
  inside (so ``GLOO_SOCKET_IFNAME=veth0`` holds in every namespace), at ``10.77.X.2``, ``.3``, ...;
  its root-side end ``nsv<pid>x<i>`` is enslaved to the bridge, so namespaces reach the root and
  each other;
* per namespace ``/etc/netns/<ns>/hosts``, which ``ip netns exec`` bind-mounts over ``/etc/hosts``
  for the process it starts (slurmd, and so its slurmstepds and tasks): every node name resolves
  to its address, and so does this machine's host name, to the namespace's own address (the
  namespaces share the UTS namespace, so ``hostname`` is the same everywhere; gloo binds to what
  the host name resolves to, and would otherwise fall back to 127.0.0.1 and be unreachable).

slurmd started by ``ip netns exec`` sees a fresh sysfs on ``/sys`` (iproute2 remounts it for the
namespace), so ``/sys/fs/cgroup`` is empty in there and slurmd's default ``CgroupPlugin=autodetect``
fails ("No filesystem mounted on /sys/fs/cgroup", "slurmd initialization failed").
``LocalSlurm`` therefore writes a ``cgroup.conf`` with ``CgroupPlugin=cgroup/v1`` when a node lives in
a namespace; with ``proctrack/linuxproc`` and ``task/none`` nothing then needs a mounted cgroup
hierarchy.

Use::

    with veth_namespaces(["n1", "n2"]) as topo:
        with LocalSlurm(root, controller=topo.gateway, nodes=topo.slurm_nodes()) as cluster:
            ...

On exit (also on error) everything above that it created is deleted again. Needs root
(CAP_NET_ADMIN and CAP_SYS_ADMIN for ``ip netns``); ``netns_available()`` says whether it works here.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

NETNS_ETC = Path("/etc/netns")
IFNAME = "veth0"  # the veth's name inside every namespace


@dataclass
class NsNode:
    name: str  # the node's name (slurmd -N, NodeName), resolvable inside every namespace
    netns: str  # the namespace, for `ip netns exec`
    address: str


@dataclass
class Topology:
    gateway: str  # the root namespace's address on the bridge (the controller's)
    subnet: str
    bridge: str
    nodes: list[NsNode] = field(default_factory=list)

    def address(self, name: str) -> str:
        return next(n.address for n in self.nodes if n.name == name)

    def slurm_nodes(self) -> list:
        """``tests.slurm_cluster.Node``s for ``LocalSlurm(nodes=...)``."""
        from .slurm_cluster import Node

        return [Node(n.name, n.address, n.netns) for n in self.nodes]



def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out


_available: Optional[tuple[Optional[str]]] = None


def netns_available() -> Optional[str]:
    """None when namespaces, veths and a bridge can be made here, else the reason they cannot."""
    global _available
    if _available is None:
        _available = (_probe(),)
    return _available[0]


def _probe() -> Optional[str]:
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    try:
        with veth_namespaces(["probe"], hosts=False, subnet="10.77.255.0/24"):
            pass
    except Exception as e:  # noqa: BLE001 - the reason is the answer
        return f"cannot make network namespaces here: {e}"
    return None


def _free_subnet() -> str:
    """The first 10.77.X.0/24 that no address in the root namespace lies in."""
    used = _ip("-4", "-o", "addr", "show").stdout
    for x in range(0, 255):
        if f" 10.77.{x}." not in used:
            return f"10.77.{x}.0/24"
    raise RuntimeError("no free 10.77.X.0/24 subnet")


@contextmanager
def veth_namespaces(names: Sequence[str], subnet: Optional[str] = None, hosts: bool = True,
                    mtu: int = 1500) -> Iterator[Topology]:
    """Namespaces for ``names`` on a bridge in ``subnet`` (default: a free 10.77.X.0/24); yields the ``Topology``.

    Everything it made is deleted on exit, each step on its own, so that one failure does not leave
    the rest behind; deletion errors are raised after all steps were tried (unless an error is
    already on its way out).
    """
    pid = os.getpid()
    net = ipaddress.ip_network(subnet or _free_subnet())
    hosts_iter = net.hosts()
    gateway = str(next(hosts_iter))
    bridge = f"nsbr{pid}"
    topo = Topology(gateway=gateway, subnet=str(net), bridge=bridge)
    undo: list[tuple[str, callable]] = []  # run in reverse order on exit
    try:
        _ip("link", "add", bridge, "type", "bridge")
        undo.append((f"bridge {bridge}", lambda: _ip("link", "del", bridge)))
        _ip("link", "set", bridge, "mtu", str(mtu))
        _ip("addr", "add", f"{gateway}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(names):
            ns, outer = f"slurm-{name}-{pid}", f"nsv{pid}x{i}"
            address = str(next(hosts_iter))
            _ip("netns", "add", ns)
            undo.append((f"netns {ns}", lambda ns=ns: _ip("netns", "del", ns)))
            # the peer is born inside the namespace, so its name cannot clash with the root's
            _ip("link", "add", outer, "mtu", str(mtu), "type", "veth", "peer", "name", IFNAME, "mtu", str(mtu), "netns", ns)
            undo.append((f"veth {outer}", lambda outer=outer: _ip("link", "del", outer)))
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{address}/{net.prefixlen}", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            topo.nodes.append(NsNode(name, ns, address))
        if hosts:
            for node in topo.nodes:
                d = NETNS_ETC / node.netns
                made_etc = not NETNS_ETC.exists()
                d.mkdir(parents=True, exist_ok=True)
                undo.append((f"{d}", lambda d=d, made_etc=made_etc: _remove_etc(d, made_etc)))
                (d / "hosts").write_text(_hosts_file(topo, node))
        yield topo
    except BaseException:
        _undo(undo, raise_errors=False)
        raise
    else:
        _undo(undo, raise_errors=True)


def _hosts_file(topo: Topology, me: NsNode) -> str:
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    host = socket.gethostname()
    for node in topo.nodes:
        aliases = [node.name] + ([host] if node is me and host not in {n.name for n in topo.nodes} else [])
        lines.append(f"{node.address} {' '.join(aliases)}")
    return "\n".join(lines) + "\n"


def _remove_etc(d: Path, made_etc: bool) -> None:
    shutil.rmtree(d)
    if made_etc:
        try:
            NETNS_ETC.rmdir()  # only if empty: a parallel run may use it too
        except OSError:
            pass


def _undo(undo: list, raise_errors: bool) -> None:
    errors = []
    for what, step in reversed(undo):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - keep deleting the rest
            # a veth whose namespace went first is gone with it
            if "Cannot find device" not in str(e):
                errors.append(f"{what}: {e}")
    undo.clear()
    if errors and raise_errors:
        raise RuntimeError("network namespace clean-up failed: " + "; ".join(errors))
