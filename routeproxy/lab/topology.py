"""The lab's network, written as one shell script that runs inside UML.

    c1..cK ──veth── lrp ──veth── nat ──veth── rrp ──veth── srv
    (pptp-linux      (LAN        (MASQUERADE;   (router,    (pptpd,
     + pppd)          router)     GRE dropped    or RRP)     pool 192.168.90.x)
                                  in nat modes)

Every box is a network namespace of one UML kernel.  Addresses (see docs/lab.md):
clients 10.1.0.(10+i)/24, lrp 10.1.0.1 and 10.2.0.1, nat 10.2.0.2 and 10.3.0.2,
rrp 10.3.0.3 and 10.4.0.3, srv 10.4.0.4; PPP: pptpd 192.168.90.1, clients from
192.168.90.100.

Modes:
  direct      plain routers all the way: the control case
  nat         MASQUERADE at nat, no pptp helper, GRE dropped: only TCP crosses
  nat-helper  MASQUERADE with nf_conntrack_pptp/nf_nat_pptp assigned, GRE allowed
  proxy       clients dial the LRP (lrp ns), LRP -> TLS over the nat (as in
              `nat`) -> RRP (rrp ns) -> pptpd
  proxy-colocated  the same, with the RRP inside the server's namespace

With `calls_per_client` N > 1 each client host runs N pppd (units ppp0..pppN-1, tunnels
cI-1..cI-N) in one mount namespace, so that pptp-linux gives them one call manager: one
control connection carrying N calls, as on a real host dialling one server several times.

The script prints `LAB-RESULT key=value ...` lines (one per tunnel) that `parse_results` reads.
"""
import json
import os
import re
import shlex
import sys

MODES = ("direct", "nat", "nat-helper", "proxy", "proxy-colocated")
PROXY_MODES = ("proxy", "proxy-colocated")

CLIENT_NET = "10.1.0"
LRP_LAN = "10.1.0.1"
LRP_WAN, NAT_IN = "10.2.0.1", "10.2.0.2"
NAT_OUT, RRP_WAN = "10.3.0.2", "10.3.0.3"
RRP_LAN, SERVER = "10.4.0.3", "10.4.0.4"
PPP_SERVER = "192.168.90.1"
PPP_POOL = "192.168.90.100-199"
RRP_TLS_PORT = 4443
STATUS_PORT = 8180        # each proxy daemon's --status, in its own namespace (read after a transfer)
TRANSFER_PORT = 5001

MODULES = ("ppp_generic", "ppp_async", "ppp_mppe", "veth", "bridge", "iptable_filter",
           "iptable_nat", "iptable_raw", "xt_MASQUERADE", "xt_tcpudp", "xt_CT", "nf_conntrack")
HELPER_MODULES = ("nf_conntrack_pptp", "nf_nat_pptp")
CUT_MODULES = ("nf_reject_ipv4", "ipt_REJECT")   # --cut-link: the NAT's TCP resets
LINK_RATE_MODULES = ("sch_tbf",)   # --link-rate: the NAT's links shaped


class LabScriptError(ValueError):
    """The lab was asked for something it cannot build."""


def lab_modules(mode, cut_link=0, link_rate=None):
    """UML kernel modules the mode needs (the pptp helper only where it is wanted:
    modules are global to the UML kernel)."""
    return (MODULES + (HELPER_MODULES if mode == "nat-helper" else ())
            + (CUT_MODULES if cut_link else ()) + (LINK_RATE_MODULES if link_rate else ()))


def client_address(i):
    return f"{CLIENT_NET}.{10 + i}"


def tunnel_client(name):
    """The client number of a tunnel name: c3 -> 3, c3-2 -> 3."""
    return int(name[1:].split("-")[0])


def repo_root():
    """The checkout holding the routeproxy package (for PYTHONPATH and twisted/plugins)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dial_address(mode):
    """Where the clients send their PPTP control connection."""
    return LRP_LAN if mode in PROXY_MODES else SERVER


# Proxy hook: the commands that start the daemons.  They run inside UML, where
# the host's files (this checkout and its venv) are the root filesystem.
CERTS_COMMAND = '"$PY" -m routeproxy certs --out "$CERTS" --lrp-name lrp.lab --rrp-name rrp.lab'
LRP_COMMAND = ('"$PY" -c "from twisted.scripts.twistd import run; run()" -n --logfile "$LOGS/lrp.log" '
               '--pidfile /run/lrp.pid routeproxy-lrp '
               '--pptp-listen {lrp_lan}:1723 --rrp {rrp_addr}:{tls_port} --rrp-name rrp.lab '
               '--cert "$CERTS/lrp.crt" --key "$CERTS/lrp.key" --ca "$CERTS/ca.crt" '
               '--status 127.0.0.1:{status_port}')
RRP_COMMAND = ('"$PY" -c "from twisted.scripts.twistd import run; run()" -n --logfile "$LOGS/rrp.log" '
               '--pidfile /run/rrp.pid routeproxy-rrp '
               '--listen 0.0.0.0:{tls_port} --pptp-server {pptp_server} '
               '--cert "$CERTS/rrp.crt" --key "$CERTS/rrp.key" --ca "$CERTS/ca.crt" '
               '--status 127.0.0.1:{status_port}')


MAX_CALLS_PER_CLIENT = 8


LINK_RATE = r"""
# --link-rate: the NAT's links toward the LRP and toward the RRP (or the server) send at most
# {mbit} Mbit/s each (tbf, 16 KB burst, a 64 KB queue): a slow path between the two sites,
# which both paths cross
for d in nat-lrp nat-rrp; do
  ns nat tc qdisc add dev $d root tbf rate {mbit}mbit burst 16kb limit 64kb \
    || echo "LAB-ERROR tc tbf on $d failed"
done
echo "LAB-LINK-RATE mbit={mbit}"
"""

# with --link-rate: c1 pings the server through its tunnel every 0.2 s while the transfer runs
# (latency under load: what the standing queues add), LAB-PING-LOAD with each reply's time
PING_LOAD = r"""
ns c1 busybox ping -I ppp0 -i 0.2 -w 600 192.168.90.1 > /tmp/ping-load 2>&1 &
PING_LOAD=$!
"""
PING_LOAD_END = r"""
kill $PING_LOAD 2>/dev/null; wait $PING_LOAD 2>/dev/null
echo "LAB-PING-LOAD $(grep -o 'time=[0-9.]*' /tmp/ping-load | cut -d= -f2 | tr '\n' ' ')"
"""


RMEM = r"""
# --rmem-default: every socket that sizes no buffer of its own (pptpd's and pptp-linux's GRE
# sockets) gets this receive buffer, in every namespace (the sysctl is the namespace's own
# on newer kernels, global on older ones: both are set)
sysctl -qw net.core.rmem_max={rmem} net.core.rmem_default={rmem}
for n in $(namespaces); do
  ns $n sysctl -qw net.core.rmem_max={rmem} net.core.rmem_default={rmem} 2>/dev/null
done
echo "LAB-RMEM srv=$(ns srv cat /proc/sys/net/core/rmem_default)"
"""


def build_script(mode, clients, transfer_mb=0, connect_timeout=25, python=None, mtu=None,
                 hangup=False, calls_per_client=1, cut_link=0, proxy_options=(), rmem_default=None,
                 link_rate=None):
    """The /bin/sh payload for `run_in_uml` that builds the lab and measures it.

    `hangup`: after the pings, kill client 1's (first) pppd, check the others still
    ping and pptpd cleared the call, then dial it again.
    `calls_per_client`: pppd per client host, sharing one pptp call manager.
    `cut_link`: (proxy modes) 2 s into the transfer the NAT resets the link's TCP both
    ways for that many seconds; the run reports whether every pppd survived (LAB-CUT).
    `proxy_options`: more options for both daemons (e.g. ``("--gre-capture", "raw")``).
    `rmem_default`: bytes of receive buffer for every socket that sizes none itself
    (pptpd's GRE socket: a busy server's stalls start where it overflows; docs/lab.md).
    `link_rate`: Mbit/s each way through the NAT (a slow path between the sites); with a
    transfer, c1 pings the server through its tunnel meanwhile (latency under load).
    """
    if link_rate is not None and not 0.1 <= link_rate <= 10000:
        raise LabScriptError(f"--link-rate {link_rate}: must be 0.1..10000 Mbit/s")
    if rmem_default is not None and not 4096 <= rmem_default <= 1 << 30:
        raise LabScriptError(f"--rmem-default {rmem_default}: must be 4096..{1 << 30} bytes")
    if cut_link and mode not in PROXY_MODES:
        raise LabScriptError(f"--cut-link needs a proxy mode ({', '.join(PROXY_MODES)}), not {mode}")
    if not 0 <= cut_link <= 120:
        raise LabScriptError(f"--cut-link {cut_link}: must be 0..120 seconds")
    if mode not in MODES:
        raise LabScriptError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 1 <= clients <= 90:
        raise LabScriptError(f"--clients {clients}: must be 1..90 (the PPP pool has 100 addresses)")
    if not 1 <= calls_per_client <= MAX_CALLS_PER_CLIENT:
        raise LabScriptError(f"--calls-per-client {calls_per_client}: must be 1..{MAX_CALLS_PER_CLIENT}")
    if clients * calls_per_client > 90:
        raise LabScriptError(f"--clients {clients} x --calls-per-client {calls_per_client}: at most 90 "
                             "tunnels (the PPP pool has 100 addresses)")
    if transfer_mb < 0:
        raise LabScriptError(f"transfer size {transfer_mb} MB is negative")
    python = python or sys.executable
    parts = [
        PRELUDE.format(py=shlex.quote(python), root=shlex.quote(repo_root()), k=clients,
                       mode=mode, n=calls_per_client),
        NETWORK,
        NAT_RULES[mode],
        RMEM.format(rmem=int(rmem_default)) if rmem_default else "",
        LINK_RATE.format(mbit=f"{link_rate:g}") if link_rate else "",
        SERVER_SETUP,
    ]
    if mode in PROXY_MODES:
        rrp_ns = "srv" if mode == "proxy-colocated" else "rrp"
        rrp_addr = SERVER if mode == "proxy-colocated" else RRP_WAN
        pptp_server = "127.0.0.1" if mode == "proxy-colocated" else SERVER
        more = "".join(" " + shlex.quote(option) for option in proxy_options)
        parts.append(PROXY_SETUP.format(
            certs=CERTS_COMMAND, rrp_ns=rrp_ns, rrp_addr=rrp_addr,
            lrp=LRP_COMMAND.format(lrp_lan=LRP_LAN, rrp_addr=rrp_addr, tls_port=RRP_TLS_PORT,
                                   status_port=STATUS_PORT) + more,
            rrp=RRP_COMMAND.format(tls_port=RRP_TLS_PORT, pptp_server=pptp_server,
                                   status_port=STATUS_PORT) + more,
            tls_port=RRP_TLS_PORT))
    if mtu is not None and not 576 <= mtu <= 1500:
        raise LabScriptError(f"--mtu {mtu}: must be 576..1500")
    parts.append(CLIENTS.format(dial=dial_address(mode), timeout=int(connect_timeout),
                                mtu=f"mtu {mtu}\nmru {mtu}" if mtu else "# pppd's default MTU/MRU (1500)"))
    if hangup:
        parts.append(HANGUP.format(timeout=int(connect_timeout)))
    if cut_link:
        parts.append(CUT_LINK.format(port=RRP_TLS_PORT, seconds=int(cut_link)))
    if transfer_mb:
        parts.append(TRANSFER.format(mb=int(transfer_mb), port=TRANSFER_PORT, status=STATUS_PORT,
                                     ping_load=PING_LOAD if link_rate else "",
                                     ping_load_end=PING_LOAD_END if link_rate else ""))
    if cut_link:
        parts.append(CUT_LINK_END.format(seconds=int(cut_link)))
    parts.append(FINISH)
    return "\n".join(parts)


PRELUDE = r"""#!/bin/sh
# routeproxy lab payload (generated by routeproxy.lab.topology); runs inside UML.
PY={py}
export PYTHONPATH={root}
K={k}
N={n}
MODE={mode}
LOGS=$LAB_WORK/logs
mkdir -p $LOGS /run/pptp /etc/ppp/peers
t0=$(cut -d' ' -f1 /proc/uptime)
stamp() {{ echo "LAB-TIME $1 $(awk -v t0=$t0 '{{printf "%.2f", $1 - t0}}' /proc/uptime)"; }}
busybox syslogd -O /var/log/messages
uptime() {{ read up _ < /proc/uptime; up=${{up%.*}}; }}   # whole seconds, no exec
ns() {{ ip netns exec "$@"; }}
namespaces() {{ # every namespace of the lab: the clients' (c1..cK), then lrp nat rrp srv
  n=1; while [ $n -le $K ]; do echo c$n; n=$((n + 1)); done; echo lrp nat rrp srv
}}
each_tunnel() {{ # run "$@" once per tunnel, with i (client), j, t (name: cI, or cI-J) and u (ppp unit)
  i=1
  while [ $i -le $K ]; do
    j=1
    while [ $j -le $N ]; do
      t=c$i; [ $N -gt 1 ] && t=c$i-$j
      u=$((j - 1))
      "$@"
      j=$((j + 1))
    done
    i=$((i + 1))
  done
}}
"""

NETWORK = r"""
for n in lrp nat rrp srv; do ip netns add $n; done
for n in lrp nat rrp srv; do ns $n ip link set lo up; ns $n sysctl -qw net.ipv4.ip_forward=1; done
ns lrp ip link add br0 type bridge
ns lrp ip addr add 10.1.0.1/24 dev br0
ns lrp ip link set br0 up
i=1
while [ $i -le $K ]; do
  ip netns add c$i
  ns c$i ip link set lo up
  ip link add veth$i type veth peer name eth0 netns c$i
  ip link set veth$i netns lrp
  ns lrp ip link set veth$i master br0 up
  ns c$i ip addr add 10.1.0.$((10 + i))/24 dev eth0
  ns c$i ip link set eth0 up
  ns c$i ip route add default via 10.1.0.1
  i=$((i + 1))
done
link() { # link NS_A ADDR_A NS_B ADDR_B /24
  ip link add "$1-$3" type veth peer name "$3-$1"
  ip link set "$1-$3" netns $1; ip link set "$3-$1" netns $3
  ns $1 ip addr add $2/24 dev "$1-$3"; ns $1 ip link set "$1-$3" up
  ns $3 ip addr add $4/24 dev "$3-$1"; ns $3 ip link set "$3-$1" up
}
link lrp 10.2.0.1 nat 10.2.0.2
link nat 10.3.0.2 rrp 10.3.0.3
link rrp 10.4.0.3 srv 10.4.0.4
ns lrp ip route add default via 10.2.0.2
ns nat ip route add 10.1.0.0/24 via 10.2.0.1
ns nat ip route add default via 10.3.0.3
ns rrp ip route add 10.1.0.0/16 via 10.3.0.2
ns rrp ip route add 10.2.0.0/24 via 10.3.0.2
ns srv ip route add default via 10.4.0.3
stamp network
"""

_NAT = r"""
ns nat iptables-legacy -t nat -A POSTROUTING -o nat-rrp -j MASQUERADE
"""
_DROP_GRE = r"""
ns nat iptables-legacy -A FORWARD -p 47 -j DROP
"""
_HELPER = r"""
# Linux >= 6.0 never assigns helpers on its own: name the pptp helper explicitly
ns nat iptables-legacy -t raw -A PREROUTING -p tcp --dport 1723 -j CT --helper pptp
"""
NAT_RULES = {
    "direct": "\n# direct: plain routing, no NAT\n",
    "nat": _NAT + _DROP_GRE,
    "nat-helper": _NAT + _HELPER,
    "proxy": _NAT + _DROP_GRE,
    "proxy-colocated": _NAT + _DROP_GRE,
}

SERVER_SETUP = r"""
: > /etc/ppp/options
cat > /etc/ppp/pptpd-options <<EOF
name pptpd
refuse-pap
refuse-chap
refuse-mschap
require-mschap-v2
require-mppe-128
nobsdcomp
nodeflate
novj
noipv6
nodefaultroute
noproxyarp
lcp-echo-interval 0
logfile /var/log/pppd-server.log
EOF
cat > /etc/pptpd.conf.lab <<EOF
option /etc/ppp/pptpd-options
localip 192.168.90.1
remoteip 192.168.90.100-199
EOF
: > /etc/ppp/chap-secrets
chmod 600 /etc/ppp/chap-secrets
secret() { echo "user${t#c} pptpd secret-${t#c}-lab *" >> /etc/ppp/chap-secrets; }
each_tunnel secret
ns srv pptpd -c /etc/pptpd.conf.lab -p /run/pptpd.pid
"""

PROXY_SETUP = r"""
# proxy hook: the LRP in ns lrp, the RRP in ns {rrp_ns}; certificates from `routeproxy certs`
CERTS=/run/certs
RRP_NS={rrp_ns}
mkdir -p $CERTS
{certs} > $LOGS/certs.out 2>&1 || {{ echo "LAB-ERROR certs failed"; cat $LOGS/certs.out; }}
cd "$PYTHONPATH"
ns {rrp_ns} {rrp} > $LOGS/rrp.out 2>&1 &
ns lrp {lrp} > $LOGS/lrp.out 2>&1 &
cd "$LAB_WORK"
uptime; deadline=$((up + 30))
until ns lrp busybox netstat -ltn 2>/dev/null | grep -q ":1723 " || [ $up -ge $deadline ]; do sleep 0.5; uptime; done
stamp daemons
"""

CLIENTS = r"""
sleep 0.5
peer() {{
  cat > /etc/ppp/peers/$t <<EOF
pty "pptp {dial} --nolaunchpppd --nohostroute --loglevel 1"
name user${{t#c}}
password secret-${{t#c}}-lab
remotename pptpd
require-mppe-128
refuse-pap
refuse-chap
refuse-mschap
refuse-eap
nobsdcomp
nodeflate
novj
noipv6
noauth
nodefaultroute
nodetach
maxfail 1
lcp-echo-interval 0
unit $u
ipparam $t
linkname $t
{mtu}
logfile $LOGS/pppd-$t.log
EOF
}}
each_tunnel peer
stamp dial
# all clients dial at the same moment, each in its own mount namespace so that
# pptp-linux's call-manager socket (/run/pptp) is not shared between clients; with
# N > 1 a client's N pppd share that namespace, so they share one call manager
# (one control connection), one second apart so that the first has started it
# `ip netns exec` forks, so $! is not pppd: pppd's own pid file (linkname) is
pppd_pid() {{ head -n 1 /run/ppp-$1.pid 2>/dev/null; }}
dial() {{ # dial I: start client I's pppd (all N of them)
  if [ $N -eq 1 ]; then
    ns c$1 unshare -m --propagation private sh -c \
      'mount -t tmpfs tmpfs /run/pptp && exec pppd call c'$1 >> $LOGS/client-c$1.out 2>&1 &
  else
    ns c$1 unshare -m --propagation private sh -c \
      'mount -t tmpfs tmpfs /run/pptp || exit 1; j=1; while [ $j -le '$N' ]; do
         pppd call c'$1'-$j & j=$((j + 1)); [ $j -le '$N' ] && sleep 1; done; wait' \
      >> $LOGS/client-c$1.out 2>&1 &
  fi
  eval "PPPD_$1=$!"
}}
i=1
while [ $i -le $K ]; do dial $i; i=$((i + 1)); done
ppp_addr() {{ ip -n c$1 -4 -o addr show dev ppp${{2:-0}} 2>/dev/null | awk '{{print $4}}' | cut -d/ -f1; }}
# ppp interfaces with an address, in the client namespaces only (pptpd's are in srv)
ppp_up() {{ ip -all netns exec ip -4 -o addr show 2>/dev/null |
  awk '/^netns:/ {{c = ($2 ~ /^c[0-9]/)}} c && / ppp[0-9]+ +inet / {{n++}} END {{print n + 0}}'; }}
uptime; deadline=$((up + {timeout}))
while [ $up -lt $deadline ]; do
  [ "$(ppp_up)" -ge $((K * N)) ] && break
  sleep 0.5; uptime
done
stamp connected
ping_tunnel() {{ # all pings at once: each exec inside UML is slow
  [ -n "$(ppp_addr $i $u)" ] || return
  ns c$i busybox ping -I ppp$u -c 5 -A -W 3 -w 8 192.168.90.1 > /tmp/ping-$t 2>&1 &
  pings="$pings $!"
}}
each_tunnel ping_tunnel
wait $pings   # not a bare wait: the pppds are children too
result() {{
  addr=$(ppp_addr $i $u)
  ping=no; rtt=-
  if [ -n "$addr" ]; then
    got=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping-$t)
    [ "${{got:-0}}" -gt 0 ] && ping=yes
    rtt=$(sed -n 's#.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*#\1#p' /tmp/ping-$t)
    [ -n "$rtt" ] || rtt=-
  fi
  stats=$(ns c$i cat /sys/class/net/ppp$u/statistics/tx_bytes /sys/class/net/ppp$u/statistics/rx_bytes 2>/dev/null | tr '\n' ' ')
  set -- $stats
  echo "LAB-RESULT client=$t connected=$([ -n "$addr" ] && echo yes || echo no) addr=${{addr:--}} ping=$ping rtt=$rtt tx=${{1:--}} rx=${{2:--}}"
}}
each_tunnel result
stamp pinged
"""


HANGUP = r"""
# hang-up: kill client 1's (first) pppd; the others must stay up (with N > 1 also
# client 1's other tunnels, on the same control connection), pptpd (and the
# proxies) must clear its call, and it must be able to dial again
H=c1; [ $N -gt 1 ] && H=c1-1
# pptpd's calls: the pppd processes whose parent is a pptpctrl (one per call,
# however many calls a control connection carries)
pptpd_calls() {{
  n=0
  for d in /proc/[0-9]*; do
    [ "$(cat $d/comm 2>/dev/null)" = pppd ] || continue
    set -- $(cat $d/stat 2>/dev/null)
    [ "$(cat /proc/$4/comm 2>/dev/null)" = pptpctrl ] && n=$((n + 1))
  done
  echo $n
}}
calls_before=$(pptpd_calls)
p=$(pppd_pid $H)
kill $p
if [ $N -eq 1 ]; then wait $PPPD_1; else while kill -0 $p 2>/dev/null; do sleep 0.2; done; fi
sleep 2
calls_after=$(pptpd_calls)
closed=$(grep -c "session closed: peer 10.1.0.11:" $LOGS/lrp.log 2>/dev/null)
upstreams=$(grep -c -e "RRP upstream connection [0-9]* closed" -e "RRP primary connection" $LOGS/rrp.log 2>/dev/null)
others=yes
ping_other() {{
  [ $t = $H ] && return
  ns c$i busybox ping -I ppp$u -c 2 -A -W 3 -w 5 192.168.90.1 > /tmp/ping-after-$t 2>&1 &
  pings2="$pings2 $!"
}}
each_tunnel ping_other
wait $pings2
check_other() {{
  [ $t = $H ] && return
  grep -q ' 0 packets received' /tmp/ping-after-$t && others=no
  grep -q 'packets received' /tmp/ping-after-$t || others=no
}}
each_tunnel check_other
if [ $N -eq 1 ]; then
  dial 1
else   # back into client 1's namespaces: the same pptp call manager
  p=$(pppd_pid c1-2)
  nsenter -t $p -m -n pppd call $H >> $LOGS/client-c1.out 2>&1 &
fi
uptime; deadline=$((up + {timeout}))
until [ -n "$(ppp_addr 1)" ] || [ $up -ge $deadline ]; do sleep 0.5; uptime; done
addr=$(ppp_addr 1)
ping=no
[ -n "$addr" ] && ns c1 busybox ping -I ppp0 -c 3 -A -W 3 -w 6 192.168.90.1 > /tmp/ping-redial 2>&1 \
  && ping=yes
echo "LAB-HANGUP client=$H pptpd_calls_before=$calls_before pptpd_calls_after=$calls_after lrp_closed=${{closed:-0}} rrp_upstreams_closed=${{upstreams:-0}} others_ping=$others redial_addr=${{addr:--}} redial_ping=$ping"
stamp hangup
"""


TRANSFER = r"""
# {mb} MB from every connected tunnel to the server, over that tunnel; sha256 both ends
count=0
count_up() {{ [ -n "$(ppp_addr $i $u)" ] && count=$((count + 1)); }}
each_tunnel count_up
ns srv "$PY" -m routeproxy.lab.transfer recv --port {port} --count $count > $LOGS/recv.out 2>$LOGS/recv.err &
RECV=$!
sleep 1.5
send_tunnel() {{
  if [ -n "$(ppp_addr $i $u)" ]; then
    head -c {mb}M /dev/urandom > /tmp/data-$t
    ns c$i "$PY" -m routeproxy.lab.transfer send --host 192.168.90.1 --port {port} --file /tmp/data-$t --device ppp$u > $LOGS/send-$t.out 2> $LOGS/send-$t.err &
    eval "SEND_${{i}}_$j=$!"
  fi
}}
# the proxy daemons' CPU (user + system ticks) around the transfer: LAB-CPU WHEN DAEMON TICKS HZ
daemon_cpu() {{
  for d in lrp rrp; do
    p=$(cat /run/$d.pid 2>/dev/null)
    [ -n "$p" ] && [ -r /proc/$p/stat ] && echo "LAB-CPU $1 $d $(cut -d')' -f2 /proc/$p/stat | awk '{{print $12 + $13}}') $(getconf CLK_TCK 2>/dev/null || echo 100)"
    # the same split: user and system ticks, page faults, context switches (each a trap in UML)
    [ -n "$p" ] && [ -r /proc/$p/stat ] && echo "LAB-PROC $1 $d $(cut -d')' -f2 /proc/$p/stat | awk '{{print $12, $13, $8 + $10}}') $(awk '/ctxt_switches/ {{s += $2}} END {{print s + 0}}' /proc/$p/status)"
  done
}}
# TCP's own view of the transfer and the raw sockets' drops (pptpd's, pptp-linux's and the
# proxy's GRE), in every namespace: LAB-TCP WHEN NS KEY=VALUE... (retransmissions, timeouts,
# out-of-order arrivals, RawDrops: where a stall came from)
tcp_counters() {{
  for n in $(namespaces); do
    echo "LAB-TCP $1 $n $(ns $n cat /proc/net/snmp /proc/net/netstat /proc/net/raw 2>/dev/null | awk '
      $1 == "Tcp:" || $1 == "TcpExt:" {{ if (!($1 in head)) {{ split($0, h); head[$1] = 1; next }}
        for (f = 2; f <= NF; f++) if (h[f] ~ /^(RetransSegs|TCPTimeouts|TCPLossProbes|TCPFastRetrans|TCPOFOQueue|TCPSACKReorder|TCPDSACKRecv|TCPSpuriousRTOs)$/) printf "%s=%s ", h[f], $f }}
      $1 ~ /^[0-9]+:$/ && NF >= 13 {{ raw += $NF }}
      END {{ printf "RawDrops=%d", raw }}')"
  done
}}
daemon_cpu before
tcp_counters before
each_tunnel send_tunnel
{ping_load}wait_send() {{
  eval "pid=\$SEND_${{i}}_$j"
  [ -n "$pid" ] && wait $pid
}}
each_tunnel wait_send
{ping_load_end}
daemon_cpu after
tcp_counters after
# pptp-linux (--loglevel 1) logs each GRE packet it had to hold for a missing one, or dropped
echo "LAB-GRE-ORDER buffered=$(grep -c 'buffering packet' /var/log/messages 2>/dev/null) old=$(grep -c 'discarding duplicate or old' /var/log/messages 2>/dev/null) bogus=$(grep -c 'discarding bogus' /var/log/messages 2>/dev/null)"
# the proxy daemons' GRE port counters after the transfer (docs/status.md): LAB-STATUS DAEMON JSON
daemon_status() {{
  for d in lrp rrp; do
    n=$d; [ $d = rrp ] && n=$RRP_NS
    [ -r /run/$d.pid ] && echo "LAB-STATUS $d $(ns $n busybox wget -q -O - http://127.0.0.1:{status}/status.json 2>/dev/null | tr -d '\n')"
  done
}}
daemon_status
wait $RECV
report_transfer() {{
  addr=$(ppp_addr $i $u)
  if [ -n "$addr" ]; then
    sent=$(cut -d' ' -f1 $LOGS/send-$t.out 2>/dev/null)
    secs=$(cut -d' ' -f3 $LOGS/send-$t.out 2>/dev/null)
    got=$(grep "^$addr " $LOGS/recv.out | cut -d' ' -f2)
    got_bytes=$(grep "^$addr " $LOGS/recv.out | cut -d' ' -f3)
    echo "LAB-TRANSFER client=$t bytes=$(cut -d' ' -f4 $LOGS/send-$t.out 2>/dev/null) sent_bytes=$(cut -d' ' -f2 $LOGS/send-$t.out 2>/dev/null) received_bytes=${{got_bytes:--}} seconds=${{secs:--}} sent=${{sent:--}} received=${{got:--}}"
  fi
}}
each_tunnel report_transfer
stamp transferred
"""

CUT_LINK = r"""
# --cut-link: 2 s from now (into the transfer) the NAT resets the link's TCP both ways
pid_of_tunnel() {{ printf '%s,' "$(pppd_pid $t)"; }}
pppd_before=$(each_tunnel pid_of_tunnel)
(
  sleep 2
  for dir in --dport --sport; do
    ns nat iptables-legacy -I FORWARD -p tcp $dir {port} -j REJECT --reject-with tcp-reset
  done
  stamp cut
  sleep {seconds}
  for dir in --dport --sport; do
    ns nat iptables-legacy -D FORWARD -p tcp $dir {port} -j REJECT --reject-with tcp-reset
  done
  stamp restored
) &
CUT=$!
"""

CUT_LINK_END = r"""
wait $CUT
sleep 3
pinged=0
ping_after_cut() {{
  ns c$i busybox ping -I ppp$u -c 2 -A -W 3 -w 5 192.168.90.1 > /dev/null 2>&1 && pinged=$((pinged + 1))
}}
each_tunnel ping_after_cut
echo "LAB-CUT seconds={seconds} pppd_before=$pppd_before pppd_after=$(each_tunnel pid_of_tunnel) pinged_after=$pinged resumed=$(grep -c 'link resumed after' $LOGS/lrp.log)"
"""

FINISH = r"""
final_bytes() {
  stats=$(ns c$i cat /sys/class/net/ppp$u/statistics/tx_bytes /sys/class/net/ppp$u/statistics/rx_bytes 2>/dev/null | tr '\n' ' ')
  set -- $stats
  [ -n "$1" ] && echo "LAB-BYTES client=$t tx=$1 rx=$2"
}
each_tunnel final_bytes
# hang up every client (pppd sends LCP terminate, pptp a Call-Clear-Request)
hang_up() { p=$(pppd_pid $t); [ -n "$p" ] && kill $p; }
each_tunnel hang_up
sleep 2
[ -f /run/lrp.pid ] && kill $(cat /run/lrp.pid) 2>/dev/null
[ -f /run/rrp.pid ] && kill $(cat /run/rrp.pid) 2>/dev/null
[ -f /run/pptpd.pid ] && kill $(cat /run/pptpd.pid) 2>/dev/null
sleep 0.5
cp /var/log/messages /var/log/pppd-server.log $LOGS/ 2>/dev/null
# the daemons' one line per closed session: call IDs on each side, bytes, packets
grep -h "session closed" $LOGS/lrp.log $LOGS/rrp.log 2>/dev/null | sed 's/^/LAB-LOG /'
stamp done
exit 0
"""


def parse_results(output):
    """`LAB-RESULT`/`LAB-BYTES`/`LAB-TRANSFER`/`LAB-TIME` lines -> (rows, transfers, times).

    A row's tx/rx are ppp0's byte counters at the end of the run when the
    run got that far (LAB-BYTES), else right after the pings.
    """
    rows, transfers, times, final = [], {}, {}, {}
    for line in output.splitlines():
        if line.startswith("LAB-RESULT "):
            rows.append(_fields(line))
        elif line.startswith("LAB-BYTES "):
            fields = _fields(line)
            final[fields.get("client")] = fields
        elif line.startswith("LAB-TRANSFER "):
            fields = _fields(line)
            transfers[fields.get("client")] = fields
        elif line.startswith("LAB-TIME "):
            parts = line.split()
            if len(parts) == 3:
                try:
                    times[parts[1]] = float(parts[2])
                except ValueError:
                    pass
    for row in rows:
        if row.get("client") in final:
            row["tx"], row["rx"] = final[row["client"]].get("tx", "-"), final[row["client"]].get("rx", "-")
    return rows, transfers, times


def _samples(output, tag, width):
    """{(when, daemon): [int, ...]} from `TAG WHEN DAEMON N...` lines of *width* integers."""
    seen = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 + width and parts[0] == tag:
            try:
                seen[(parts[1], parts[2])] = [int(x) for x in parts[3:]]
            except ValueError:
                continue
    return seen


def _over_transfer(samples):
    """{daemon: (before, after)} for each daemon sampled both before and after the transfer."""
    return {daemon: (samples[("before", daemon)], samples[("after", daemon)])
            for (when, daemon) in samples if when == "before" and ("after", daemon) in samples}


def parse_cpu(output):
    """{daemon: CPU seconds (user + system) it used over the transfer} from `LAB-CPU` lines
    (proxy modes with a transfer; empty otherwise)."""
    return {daemon: round((after[0] - before[0]) / (after[1] or 100), 2)
            for daemon, (before, after) in _over_transfer(_samples(output, "LAB-CPU", 2)).items()}


def parse_proc(output):
    """{daemon: {"user": s, "sys": s, "faults": n, "switches": n}} over the transfer, from
    `LAB-PROC` lines (ticks at the guest's CLK_TCK, read from `LAB-CPU`): in UML each page
    fault and each switch is a trap, as each system call is (docs/lab.md)."""
    hz = {daemon: ticks[1] or 100 for (_, daemon), ticks in _samples(output, "LAB-CPU", 2).items()}
    out = {}
    for daemon, (before, after) in _over_transfer(_samples(output, "LAB-PROC", 4)).items():
        user, system, faults, switches = (a - b for a, b in zip(after, before))
        tick = hz.get(daemon, 100)
        out[daemon] = {"user": round(user / tick, 2), "sys": round(system / tick, 2),
                       "faults": faults, "switches": switches}
    return out


def parse_tcp(output):
    """{namespace: {counter: growth over the transfer}} from `LAB-TCP` lines: the clients'
    and the server's retransmissions, timeouts and out-of-order arrivals (empty without a
    transfer)."""
    seen = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "LAB-TCP":
            seen[(parts[1], parts[2])] = {k: int(v) for k, _, v in (f.partition("=") for f in parts[3:])
                                          if v.isdigit()}
    return {ns: {k: seen[("after", ns)][k] - v for k, v in counters.items() if k in seen[("after", ns)]}
            for (when, ns), counters in seen.items() if when == "before" and ("after", ns) in seen}


def parse_ping_load(output):
    """The round-trip times (ms) of c1's pings during the transfer (`--link-rate`), or []."""
    for line in output.splitlines():
        if line.startswith("LAB-PING-LOAD"):
            return [float(t) for t in line.split()[1:] if t.replace(".", "", 1).isdigit()]
    return []


def parse_gre_order(output):
    """pptp-linux's reordering log after the transfer ({buffered, old, bogus}), or {}."""
    for line in output.splitlines():
        if line.startswith("LAB-GRE-ORDER "):
            return {k: int(v) for k, v in _fields(line).items() if v.isdigit()}
    return {}


def parse_status(output):
    """{daemon: its status snapshot after the transfer} from `LAB-STATUS` lines (proxy modes
    with a transfer; a daemon whose status did not answer is left out)."""
    found = {}
    for line in output.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] == "LAB-STATUS":
            try:
                found[parts[1]] = json.loads(parts[2])
            except ValueError:
                continue
    return found


def parse_cut(output):
    """The `LAB-CUT` line's fields, or None when the run cut no link."""
    for line in output.splitlines():
        if line.startswith("LAB-CUT "):
            return _fields(line)
    return None


def parse_hangup(output):
    """The `LAB-HANGUP` line's fields, or None when the run did no hang-up."""
    for line in output.splitlines():
        if line.startswith("LAB-HANGUP "):
            return _fields(line)
    return None


_LRP_CLOSED = re.compile(r"LRP session closed: peer (?P<client>[0-9.]+):\d+, C=(?P<C>\d+) S=(?P<S>\d+) "
                         r"L=(?P<L>\d+).*?GRE (?P<gre_in>\d+)/(?P<gre_out>\d+) packets")
_LRP_CALL = re.compile(r"C=(\d+) S=\d+ L=\d+")
_RRP_CLOSED = re.compile(r"RRP session closed: peer [0-9.]+:\d+, C=(?P<C>\d+) S=(?P<S>\d+) R=(?P<R>\d+)")


def parse_sessions(output):
    """The daemons' closed-session log lines -> {client address: {C, S, L, R, gre_in, gre_out,
    calls}}: C, S, L, R of the session's first call, ``calls`` the C of each of its calls.

    C is the client's call ID, L the one the LRP gave the client in place of S,
    R the one the RRP gave pptpd in place of C, S pptpd's (docs/architecture.md).
    Lines the daemons may word differently one day are skipped, not fatal.
    """
    sessions, rrp = {}, {}
    for line in output.splitlines():
        if not line.startswith("LAB-LOG "):
            continue
        match = _LRP_CLOSED.search(line)
        if match:
            sessions[match["client"]] = dict(match.groupdict(), calls=_LRP_CALL.findall(line))
            continue
        match = _RRP_CLOSED.search(line)
        if match:
            rrp[(match["C"], match["S"])] = match["R"]
    for session in sessions.values():
        session["R"] = rrp.get((session["C"], session["S"]), "-")
    return sessions


def _fields(line):
    fields = {}
    for word in line.split()[1:]:
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
    return fields
