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

The script prints `LAB-RESULT key=value ...` lines that `parse_results` reads.
"""
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
TRANSFER_PORT = 5001

MODULES = ("ppp_generic", "ppp_async", "ppp_mppe", "veth", "bridge", "iptable_filter",
           "iptable_nat", "iptable_raw", "xt_MASQUERADE", "xt_tcpudp", "xt_CT", "nf_conntrack")
HELPER_MODULES = ("nf_conntrack_pptp", "nf_nat_pptp")


class LabScriptError(ValueError):
    """The lab was asked for something it cannot build."""


def lab_modules(mode):
    """UML kernel modules the mode needs (the pptp helper only where it is wanted:
    modules are global to the UML kernel)."""
    return MODULES + (HELPER_MODULES if mode == "nat-helper" else ())


def client_address(i):
    return f"{CLIENT_NET}.{10 + i}"


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
               '--cert "$CERTS/lrp.crt" --key "$CERTS/lrp.key" --ca "$CERTS/ca.crt"')
RRP_COMMAND = ('"$PY" -c "from twisted.scripts.twistd import run; run()" -n --logfile "$LOGS/rrp.log" '
               '--pidfile /run/rrp.pid routeproxy-rrp '
               '--listen 0.0.0.0:{tls_port} --pptp-server {pptp_server} '
               '--cert "$CERTS/rrp.crt" --key "$CERTS/rrp.key" --ca "$CERTS/ca.crt"')


def build_script(mode, clients, transfer_mb=0, connect_timeout=25, python=None, mtu=None,
                 hangup=False):
    """The /bin/sh payload for `run_in_uml` that builds the lab and measures it.

    `hangup`: after the pings, kill client 1's pppd, check the others still
    ping and pptpd cleared the call, then dial client 1 again.
    """
    if mode not in MODES:
        raise LabScriptError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 1 <= clients <= 90:
        raise LabScriptError(f"--clients {clients}: must be 1..90 (the PPP pool has 100 addresses)")
    if transfer_mb < 0:
        raise LabScriptError(f"transfer size {transfer_mb} MB is negative")
    python = python or sys.executable
    parts = [
        PRELUDE.format(py=shlex.quote(python), root=shlex.quote(repo_root()), k=clients,
                       mode=mode),
        NETWORK,
        NAT_RULES[mode],
        SERVER_SETUP,
    ]
    if mode in PROXY_MODES:
        rrp_ns = "srv" if mode == "proxy-colocated" else "rrp"
        rrp_addr = SERVER if mode == "proxy-colocated" else RRP_WAN
        pptp_server = "127.0.0.1" if mode == "proxy-colocated" else SERVER
        parts.append(PROXY_SETUP.format(
            certs=CERTS_COMMAND, rrp_ns=rrp_ns, rrp_addr=rrp_addr,
            lrp=LRP_COMMAND.format(lrp_lan=LRP_LAN, rrp_addr=rrp_addr, tls_port=RRP_TLS_PORT),
            rrp=RRP_COMMAND.format(tls_port=RRP_TLS_PORT, pptp_server=pptp_server),
            tls_port=RRP_TLS_PORT))
    if mtu is not None and not 576 <= mtu <= 1500:
        raise LabScriptError(f"--mtu {mtu}: must be 576..1500")
    parts.append(CLIENTS.format(dial=dial_address(mode), timeout=int(connect_timeout),
                                mtu=f"mtu {mtu}\nmru {mtu}" if mtu else "# pppd's default MTU/MRU (1500)"))
    if hangup:
        parts.append(HANGUP.format(timeout=int(connect_timeout)))
    if transfer_mb:
        parts.append(TRANSFER.format(mb=int(transfer_mb), port=TRANSFER_PORT))
    parts.append(FINISH)
    return "\n".join(parts)


PRELUDE = r"""#!/bin/sh
# routeproxy lab payload (generated by routeproxy.lab.topology); runs inside UML.
PY={py}
export PYTHONPATH={root}
K={k}
MODE={mode}
LOGS=$LAB_WORK/logs
mkdir -p $LOGS /run/pptp /etc/ppp/peers
t0=$(cut -d' ' -f1 /proc/uptime)
stamp() {{ echo "LAB-TIME $1 $(awk -v t0=$t0 '{{printf "%.2f", $1 - t0}}' /proc/uptime)"; }}
busybox syslogd -O /var/log/messages
uptime() {{ read up _ < /proc/uptime; up=${{up%.*}}; }}   # whole seconds, no exec
ns() {{ ip netns exec "$@"; }}
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
i=1
while [ $i -le $K ]; do
  echo "user$i pptpd secret-$i-lab *" >> /etc/ppp/chap-secrets
  i=$((i + 1))
done
ns srv pptpd -c /etc/pptpd.conf.lab -p /run/pptpd.pid
"""

PROXY_SETUP = r"""
# proxy hook: the LRP in ns lrp, the RRP in ns {rrp_ns}; certificates from `routeproxy certs`
CERTS=/run/certs
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
i=1
while [ $i -le $K ]; do
  cat > /etc/ppp/peers/c$i <<EOF
pty "pptp {dial} --nolaunchpppd --nohostroute --loglevel 1"
name user$i
password secret-$i-lab
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
unit 0
ipparam c$i
linkname c$i
{mtu}
logfile $LOGS/pppd-c$i.log
EOF
  i=$((i + 1))
done
stamp dial
# all clients dial at the same moment, each in its own mount namespace so that
# pptp-linux's call-manager socket (/run/pptp) is not shared between clients
# `ip netns exec` forks, so $! is not pppd: pppd's own pid file (linkname) is
pppd_pid() {{ head -n 1 /run/ppp-c$1.pid 2>/dev/null; }}
dial() {{ # dial N: start client N's pppd
  ns c$1 unshare -m --propagation private sh -c \
    'mount -t tmpfs tmpfs /run/pptp && exec pppd call c'$1 >> $LOGS/client-c$1.out 2>&1 &
  eval "PPPD_$1=$!"
}}
i=1
while [ $i -le $K ]; do dial $i; i=$((i + 1)); done
ppp_addr() {{ ip -n c$1 -4 -o addr show dev ppp0 2>/dev/null | awk '{{print $4}}' | cut -d/ -f1; }}
uptime; deadline=$((up + {timeout}))
while [ $up -lt $deadline ]; do
  n=$(ip -all netns exec ip -4 -o addr show dev ppp0 2>/dev/null | grep -c ' inet ')
  [ "$n" -ge $K ] && break
  sleep 0.5; uptime
done
stamp connected
i=1
while [ $i -le $K ]; do   # all pings at once: each exec inside UML is slow
  [ -n "$(ppp_addr $i)" ] || {{ i=$((i + 1)); continue; }}
  ns c$i busybox ping -c 5 -A -W 3 -w 8 192.168.90.1 > /tmp/ping-c$i 2>&1 &
  pings="$pings $!"
  i=$((i + 1))
done
wait $pings   # not a bare wait: the pppds are children too
i=1
while [ $i -le $K ]; do
  addr=$(ppp_addr $i)
  ping=no; rtt=-
  if [ -n "$addr" ]; then
    got=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping-c$i)
    [ "${{got:-0}}" -gt 0 ] && ping=yes
    rtt=$(sed -n 's#.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*#\1#p' /tmp/ping-c$i)
    [ -n "$rtt" ] || rtt=-
  fi
  stats=$(ns c$i cat /sys/class/net/ppp0/statistics/tx_bytes /sys/class/net/ppp0/statistics/rx_bytes 2>/dev/null | tr '\n' ' ')
  set -- $stats
  echo "LAB-RESULT client=c$i connected=$([ -n "$addr" ] && echo yes || echo no) addr=${{addr:--}} ping=$ping rtt=$rtt tx=${{1:--}} rx=${{2:--}}"
  i=$((i + 1))
done
stamp pinged
"""

HANGUP = r"""
# hang-up: kill client 1's pppd; the others must stay up, pptpd (and the proxies)
# must clear its call, and client 1 must be able to dial again
calls_before=$(busybox ps | grep -c '[p]ptpctrl')
kill $(pppd_pid 1)
wait $PPPD_1
sleep 2
calls_after=$(busybox ps | grep -c '[p]ptpctrl')
closed=$(grep -c "session closed: peer 10.1.0.11:" $LOGS/lrp.log 2>/dev/null)
others=yes
i=2
while [ $i -le $K ]; do
  ns c$i busybox ping -c 2 -A -W 3 -w 5 192.168.90.1 > /tmp/ping-after-c$i 2>&1 &
  pings2="$pings2 $!"
  i=$((i + 1))
done
wait $pings2
i=2
while [ $i -le $K ]; do
  grep -q ' 0 packets received' /tmp/ping-after-c$i && others=no
  grep -q 'packets received' /tmp/ping-after-c$i || others=no
  i=$((i + 1))
done
dial 1
uptime; deadline=$((up + {timeout}))
until [ -n "$(ppp_addr 1)" ] || [ $up -ge $deadline ]; do sleep 0.5; uptime; done
addr=$(ppp_addr 1)
ping=no
[ -n "$addr" ] && ns c1 busybox ping -c 3 -A -W 3 -w 6 192.168.90.1 > /tmp/ping-redial 2>&1 \
  && ping=yes
echo "LAB-HANGUP client=c1 pptpd_calls_before=$calls_before pptpd_calls_after=$calls_after lrp_closed=${{closed:-0}} others_ping=$others redial_addr=${{addr:--}} redial_ping=$ping"
stamp hangup
"""

TRANSFER = r"""
# {mb} MB from every connected client to the server, over its tunnel; sha256 both ends
count=0; i=1
while [ $i -le $K ]; do [ -n "$(ppp_addr $i)" ] && count=$((count + 1)); i=$((i + 1)); done
ns srv "$PY" -m routeproxy.lab.transfer recv --port {port} --count $count > $LOGS/recv.out 2>$LOGS/recv.err &
RECV=$!
sleep 1.5
i=1
while [ $i -le $K ]; do
  if [ -n "$(ppp_addr $i)" ]; then
    head -c {mb}M /dev/urandom > /tmp/data-c$i
    ns c$i "$PY" -m routeproxy.lab.transfer send --host 192.168.90.1 --port {port} --file /tmp/data-c$i > $LOGS/send-c$i.out 2> $LOGS/send-c$i.err &
    eval "SEND_$i=$!"
  fi
  i=$((i + 1))
done
i=1
while [ $i -le $K ]; do
  eval "pid=\$SEND_$i"
  [ -n "$pid" ] && wait $pid
  i=$((i + 1))
done
wait $RECV
i=1
while [ $i -le $K ]; do
  addr=$(ppp_addr $i)
  if [ -n "$addr" ]; then
    sent=$(cut -d' ' -f1 $LOGS/send-c$i.out 2>/dev/null)
    secs=$(cut -d' ' -f3 $LOGS/send-c$i.out 2>/dev/null)
    got=$(grep "^$addr " $LOGS/recv.out | cut -d' ' -f2)
    got_bytes=$(grep "^$addr " $LOGS/recv.out | cut -d' ' -f3)
    echo "LAB-TRANSFER client=c$i bytes=$(cut -d' ' -f4 $LOGS/send-c$i.out 2>/dev/null) sent_bytes=$(cut -d' ' -f2 $LOGS/send-c$i.out 2>/dev/null) received_bytes=${{got_bytes:--}} seconds=${{secs:--}} sent=${{sent:--}} received=${{got:--}}"
  fi
  i=$((i + 1))
done
stamp transferred
"""

FINISH = r"""
i=1
while [ $i -le $K ]; do
  stats=$(ns c$i cat /sys/class/net/ppp0/statistics/tx_bytes /sys/class/net/ppp0/statistics/rx_bytes 2>/dev/null | tr '\n' ' ')
  set -- $stats
  [ -n "$1" ] && echo "LAB-BYTES client=c$i tx=$1 rx=$2"
  i=$((i + 1))
done
# hang up every client (pppd sends LCP terminate, pptp a Call-Clear-Request)
i=1
while [ $i -le $K ]; do p=$(pppd_pid $i); [ -n "$p" ] && kill $p; i=$((i + 1)); done
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


def parse_hangup(output):
    """The `LAB-HANGUP` line's fields, or None when the run did no hang-up."""
    for line in output.splitlines():
        if line.startswith("LAB-HANGUP "):
            return _fields(line)
    return None


_LRP_CLOSED = re.compile(r"LRP session closed: peer (?P<client>[0-9.]+):\d+, C=(?P<C>\d+) S=(?P<S>\d+) "
                         r"L=(?P<L>\d+).*?GRE (?P<gre_in>\d+)/(?P<gre_out>\d+) packets")
_RRP_CLOSED = re.compile(r"RRP session closed: peer [0-9.]+:\d+, C=(?P<C>\d+) S=(?P<S>\d+) R=(?P<R>\d+)")


def parse_sessions(output):
    """The daemons' closed-session log lines -> {client address: {C, S, L, R, gre_in, gre_out}}.

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
            sessions[match["client"]] = match.groupdict()
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
